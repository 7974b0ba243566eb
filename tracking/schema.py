"""One naming authority for every MLflow param, metric, tag and artifact name.

Writers (entry points, ``tracking.runs``) and readers (``analysis/``) import names from here,
so a renamed metric cannot silently break a table.
"""
import re

# ---- experiments -------------------------------------------------------------------------
DEFAULT_EXPERIMENT = "gqaprune"
ANALYSIS_EXPERIMENT = "gqaprune-analysis"

# ---- tags --------------------------------------------------------------------------------
TAG_STAGE = "stage"                 # prune | finetune | eval | search | analysis
TAG_MODEL_ALIAS = "model_alias"
TAG_MODEL_FAMILY = "model_family"   # Llama | Qwen | Mistral | ...
TAG_MODEL_VARIANT = "model_variant" # Base | Instruct
TAG_MODEL_PATH = "model_path"       # resolved HF id or directory
TAG_METHOD = "method"
TAG_SOURCE_RUN = "source_run_id"    # the run whose model this run consumed
TAG_SOURCE_URI = "source_model_uri"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_FAILURE = "failure_reason"      # one-line reason of a FAILED run
TAG_RUN_NAME = "mlflow.runName"

STAGE_PRUNE = "prune"
STAGE_FINETUNE = "finetune"
STAGE_EVAL = "eval"
STAGE_SEARCH = "search"
STAGE_ANALYSIS = "analysis"

# ---- prune metrics -----------------------------------------------------------------------
M_PARAMS_BEFORE = "params_before"
M_PARAMS_AFTER = "params_after"
M_PRUNABLE_BEFORE = "prunable_params_before"
M_PRUNABLE_AFTER = "prunable_params_after"
M_ACHIEVED_RATIO = "achieved_ratio"           # fraction of prunable params removed
M_ACHIEVED_TOTAL_RATIO = "achieved_total_ratio"  # fraction of all params removed
M_PRUNE_TIME = "pruning_time_s"
M_SCORING_TIME = "scoring_time_s"
M_PEAK_MEMORY = "peak_memory_mb"
M_LAYER_KEPT_ATTN = "layer_{layer:02d}_kept_attn_frac"
M_LAYER_KEPT_MLP = "layer_{layer:02d}_kept_mlp_frac"
M_LAYER_KEPT = "layer_{layer:02d}_kept_frac"

# ---- artifacts ---------------------------------------------------------------------------
A_PLAN = "pruning_plan.json"
A_LAYER_SUMMARY = "pruning_summary_by_layer.csv"
A_LAYER_SUMMARY_FIG = "pruning_summary_by_layer.png"
A_PRUNED_MODEL = "pruned_model"
A_FINETUNED_MODEL = "finetuned_model"
A_ADAPTER = "lora_adapter"
A_CONFIG = "run_config.json"
A_GRAD_DIAGNOSIS = "gradient_diagnosis.json"
A_LAYER_IMPORTANCE = "layer_importance_config.json"

# Artifact paths under which a run stores a loadable model, in order of preference.
MODEL_ARTIFACTS = (A_FINETUNED_MODEL, A_PRUNED_MODEL)

# ---- sanitising --------------------------------------------------------------------------
_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(*parts: str) -> str:
    """Join parts into a valid MLflow metric name.

    MLflow allows alphanumerics, ``_ - . / space``; lm-eval keys such as ``acc,none`` and
    ``acc_norm_stderr,none`` contain commas, so everything else becomes ``_``.
    >>> metric_name("arc_easy", "acc,none")
    'arc_easy/acc_none'
    """
    joined = "/".join(p.strip("/") for p in parts if p)
    return _BAD.sub("_", joined)


def layer_metric(template: str, layer: int) -> str:
    return template.format(layer=layer)


def lm_eval_metric(task: str, key: str) -> str:
    """lm-eval result key -> MLflow metric name: ``('piqa', 'acc,none') -> 'piqa/acc'``.

    The default filter ``none`` is dropped; other filters stay as a suffix
    (``'exact_match,strict-match' -> 'exact_match_strict-match'``).
    """
    measure, _, filt = key.partition(",")
    if filt and filt != "none":
        measure = f"{measure}_{filt}"
    return metric_name(task, measure)
