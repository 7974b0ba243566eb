"""One naming authority for every MLflow param, metric, tag and artifact name: it builds them and
parses them back.

Writers (entry points, ``tracking.runs``) and readers (``analysis/``) import names from here, so a
renamed metric cannot silently break a table; a guard test fails on any string literal in
``prune_entry/`` or ``analysis/`` equal to a name defined here.

**The convention.** A name is ``[<group>/]<key>``: lower-case words joined by ``_``; run-level
scalars have no group (``achieved_ratio``, ``pruning_time_s``); a *family* of values measured per
item puts the measure first and the item second, ``<measure>/<item>`` (``ppl/wikitext2``,
``kept_frac/layer_03``, ``recon_err_after/layer_03_o_proj``, ``search/points``), so MLflow's UI folds
a family into one group. lm-eval's per-task values keep lm-eval's own order, ``<task>/<measure>``
(``piqa/acc``), grouped per task. Params are the flat leaf names of the entry point's config tree
(the flags), plus the values resolved at run time (``calibration_dataset_resolved``) and
``<group>/<key>`` for resolved sweep settings and protocols.
"""
import re
from dataclasses import dataclass

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
TAG_NOT_APPLIED = "not_applied_params"  # prune: name=value of settings the method does not read
TAG_SOURCE_RATIO = "source_target_ratio"       # eval: the prune run's target ratio (see ratio_kind)
TAG_SOURCE_ACHIEVED = "source_achieved_ratio"  # eval: the prune run's achieved ratio / sparsity

STAGE_PRUNE = "prune"
STAGE_FINETUNE = "finetune"
STAGE_EVAL = "eval"
STAGE_SEARCH = "search"
STAGE_ANALYSIS = "analysis"
STAGE_CLAIMS = "claims"                # a sweep's claims registry (tracking/claims.py): not a result
TAG_CLAIMS_REGISTRY = "claims_registry"  # "true" on claims registry runs

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
M_LAYER_KEPT_ATTN = "kept_attn_frac/layer_{layer:02d}"
M_LAYER_KEPT_MLP = "kept_mlp_frac/layer_{layer:02d}"
M_LAYER_KEPT = "kept_frac/layer_{layer:02d}"

# ---- prune: non-uniform rates (layerwise / blockwise) and gradient diagnosis ----------------
M_IMPORTANCE_TIME = "importance_time_s"              # layer importance analysis (0 when reused)
M_LAYER_IMPORTANCE = "importance/layer_{layer:02d}"  # layerwise: the layer's importance
M_LAYER_BLOCK_IMPORTANCE = "importance/layer_{layer:02d}_{block}"  # blockwise: block attn | mlp
M_LAYER_TARGET_RATE = "target_rate/layer_{layer:02d}"
M_LAYER_BLOCK_TARGET_RATE = "target_rate/layer_{layer:02d}_{block}"
M_GRAD_NORM_RATIO = "grad_norm_ratio"                # max / min per-layer gradient L2 norm
M_GRAD_MEAN_RATIO = "grad_mean_ratio"                # max / min per-layer mean |gradient|
M_MEAN_RATIO = "mean_ratio"                          # max / min per-layer Taylor score per parameter
M_MEAN_RATIO_CONDITIONED = "mean_ratio_conditioned"  # the same on the clipped / normalised ranking keys
M_NUM_EXTREME_LAYERS = "num_extreme_pruning_layers"  # layers (or blocks) pruned beyond 90%
M_LAYER_GRAD_NORM = "grad_norm/layer_{layer:02d}"
M_LAYER_GRAD_MEAN = "grad_mean/layer_{layer:02d}"
TAG_EXTREME_LAYERS = "extreme_pruning_layers"        # "2,3" or "none"
TAG_IMPORTANCE_SOURCE = "importance_config_source"   # the reused config (path or runs:/ URI)
A_GRAD_DIAGNOSIS_FIG = "gradient_diagnosis.png"
A_GRAD_VERDICT = "gradient_diagnosis_verdict.txt"
A_LAYER_RATES = "layer_rates.csv"
A_LAYER_RATES_FIG = "layer_rates.png"

# ---- prune: sparsity methods (wanda, sparsegpt, magnitude_unstructured, block_hybrid) -------
# Sparsity = zeros / weights of the 7 projection matrices of every decoder layer (embeddings,
# lm_head, norms and biases never pruned, never counted).
M_TARGET_SPARSITY = "target_sparsity"
M_ACHIEVED_SPARSITY = "achieved_sparsity"
M_LAYER_SPARSITY = "sparsity/layer_{layer:02d}"
M_LAYER_TARGET_SPARSITY = "target_sparsity/layer_{layer:02d}"
M_NM_GROUPS = "nm_groups"                            # N:M groups checked
M_NM_VIOLATIONS = "nm_violations"                    # groups with more than N non-zeros
M_MAX_DAMPING = "max_damping"                        # sparsegpt: largest relative damping used
M_CALIB_FORWARDS = "calibration_forward_equivalents"  # calibration cost in full forward passes
M_CALIB_STATS_MB = "calibration_stats_mb"            # peak statistics memory (XtX, norms)
M_CALIB_LAYER_ACT_MB = "calibration_layer_activation_mb"   # one layer's calibration activations
M_CALIB_ALL_ACT_MB = "calibration_all_layers_activation_mb"  # what holding every layer's would cost
M_MODEL_SPARSITY = "model/sparsity"                  # eval: zeros share of the projection weights
TAG_RATIO_KIND = "ratio_kind"                        # prune: what the target ratio measures
RATIO_STRUCTURED = "prunable_params_removed"         # structured: pruning_ratio
RATIO_SPARSITY = "weights_zeroed"                    # sparsity: the sparsity param
P_SPARSITY = "sparsity"                              # prune: the target sparsity param
A_SPARSITY_LAYERS = "sparsity_by_layer.csv"
A_SPARSITY_PROJECTIONS = "sparsity_by_projection.csv"
A_SPARSITY_FIG = "sparsity_by_layer.png"
A_SPARSITY_PROVENANCE = "sparsity_provenance.json"   # config, calibration, OWL rates, checks

# ---- prune: obs (reconstruction-aware selection, joint select + commit) ----------------------
M_OBS_REMOVED_GROUPS = "removed_kv_groups/layer_{layer:02d}"
M_OBS_REMOVED_CHANNELS = "removed_channels/layer_{layer:02d}"
M_OBS_LAYER_RATE = "removed_frac/layer_{layer:02d}"        # fraction of the layer's prunable params
# relative error ||X_K W_K^T - Y|| / ||Y|| per projection; when: pruned (surgery alone, before
# compensation) | after (compensated)
M_OBS_ERR = "obs_err_{when}/layer_{layer:02d}_{proj}"
M_OBS_ERR_MEAN = "obs_err_{when}/mean"
M_OBS_TIME = "obs_time_s"
M_OBS_STATS_MB = "obs_stats_mb"                            # statistics + greedy state held at once
A_OBS_LAYERS = "obs_by_layer.csv"
A_OBS_PROJECTIONS = "obs_errors_by_projection.csv"
A_OBS_FIG = "obs_by_layer.png"

# ---- prune: training-free reconstruction (gqaprune/structured/reconstruct.py) -------------
M_RECON_TIME = "reconstruction_time_s"               # layer-wise surgery + refit, all layers
# relative error ||X W^T + b - Y||_F / ||Y||_F on the calibration tokens; proj: o_proj | down_proj,
# when: before | after (the refit)
M_LAYER_RECON_ERR = "recon_err_{when}/layer_{layer:02d}_{proj}"
M_RECON_ERR_MEAN = "recon_err_{when}/mean"           # mean over layers and projections
A_RECON_ERRORS = "reconstruction_errors_by_layer.csv"
A_RECON_ERRORS_FIG = "reconstruction_errors_by_layer.png"


def recon_metric(layer: int, proj: str, when: str) -> str:
    return M_LAYER_RECON_ERR.format(layer=layer, proj=proj, when=when)


def recon_mean_metric(when: str) -> str:
    return M_RECON_ERR_MEAN.format(when=when)


def rate_metric(template: str, layer: int, block: str) -> str:
    """layerwise (block ``layer``) or blockwise (``attn`` / ``mlp``) per-item metric of a family
    (M_LAYER_IMPORTANCE or M_LAYER_TARGET_RATE)."""
    if block == "layer":
        return template.format(layer=layer)
    blocks = {M_LAYER_IMPORTANCE: M_LAYER_BLOCK_IMPORTANCE, M_LAYER_TARGET_RATE: M_LAYER_BLOCK_TARGET_RATE}
    return blocks[template].format(layer=layer, block=block)


# ---- finetune (LoRA recovery) --------------------------------------------------------------
M_FT_TRAIN_LOSS = "train_loss"            # per step: mean target-token NLL of the optimizer step
M_FT_LR = "lr"                            # per step: learning rate of the update
M_FT_VAL_LOSS = "val_loss"                # per epoch (step 0 = before training): mean target NLL
M_FT_VAL_PPL = "val_ppl"                  # exp(val_loss)
M_FT_VAL_LOSS_BEFORE = "val_loss_before"  # scalar copies for tables
M_FT_VAL_LOSS_AFTER = "val_loss_after"
M_FT_TRAIN_EXAMPLES = "train_examples"
M_FT_VAL_EXAMPLES = "val_examples"
M_FT_DROPPED = "dropped_examples"         # records with no target token within seq_len
M_FT_TARGET_TOKENS = "train_target_tokens"  # target tokens in one pass over the training set
M_FT_TRAINABLE = "trainable_params"
M_FT_STEPS = "train_steps"
M_FT_TIME = "finetune_time_s"             # optimizer-step wall time, summed over resumes
TAG_FT_FORM = "data_form"                 # instruction | qa | text
TAG_FT_TEMPLATE = "template"
TAG_FT_CONFIG_KEY = "finetune_config_key"  # names the checkpoint dir a resume continues from
TAG_FT_RESUMED_FROM = "resumed_from_run_id"
TAG_FT_RESUMED_STEP = "resumed_from_step"
TAG_FT_EVAL_RUN = "eval_child_run_id"
TAG_CHECKPOINT_FORMAT = "checkpoint_format"  # vanilla | remote_code
TAG_FT_MASK_KEPT = "sparse_mask_kept"     # true | false: the zero pattern was re-applied after the merge
M_FT_BASE_SPARSITY = "base_sparsity"      # zeros / weights of the 7 projections of every layer, before LoRA
M_FT_MERGED_SPARSITY = "merged_sparsity"  # the same of the merged (saved) model
M_FT_MASK_REZEROED = "mask_rezeroed_weights"  # weights the merge made non-zero that the mask zeroed again
M_FT_VAL_LOSS_MERGED = "val_loss_merged"  # val loss of the merged model when the mask changed weights
P_FT_DATASET_RESOLVED = "dataset_resolved"    # the dataset "auto" resolved to
P_FT_VAL_PROTOCOL = "val_ppl_protocol"        # how val_loss / val_ppl were measured (one line)
P_FT_DATASET_SOURCE = "dataset_source"        # where the records came from (split / part of a file)
P_FT_TEMPLATE_RESOLVED = "template_resolved"  # the template "auto" resolved to
A_FT_CURVES = "finetune_curves.png"
A_FT_HISTORY = "finetune_history.csv"
A_FT_TEMPLATE = "prompt_template.json"
A_FT_EXAMPLE = "finetune_example.txt"

# ---- eval (perplexity, zero-shot, model facts, speed) ----------------------------------------
M_PPL = "ppl/{dataset}"                   # exp(mean NLL) under the logged protocol
M_NLL = "nll/{dataset}"                   # mean NLL per scored token (nats)
M_PPL_TOKENS = "ppl_tokens/{dataset}"     # scored tokens
M_PPL_WINDOWS = "ppl_windows/{dataset}"   # windows scored
M_ZS_MEAN = "zeroshot/mean_acc"           # mean task score (measure per acc_convention)
M_ZS_TASKS = "zeroshot/num_tasks"
M_MODEL_PARAMS = "model/params"
M_MODEL_BYTES = "model/param_bytes"       # parameters + buffers in memory at the eval dtype
M_MODEL_DISK_MB = "model/size_on_disk_mb"
M_SPEED_PREFILL = "speed/prefill_tokens_per_s"
M_SPEED_DECODE = "speed/decode_tokens_per_s"
M_SPEED_LATENCY = "speed/latency_ms_per_token"
M_SPEED_PEAK_MEM = "speed/peak_memory_mb"
M_EVAL_TIME = "eval_time_s"
P_ACC_CONVENTION = "acc_convention"
P_TASKS_RUN = "tasks_run"                 # comma-separated tasks actually evaluated
P_TASK_MEASURES = "task_measures"         # task=measure,... : the measure each task's score uses
P_PPL_RUN = "ppl_datasets_run"            # comma-separated dataset keys of the ppl/<key> metrics
P_PPL_PROTOCOL = "ppl_protocol/{dataset}"  # one-line protocol description per dataset
A_EVAL_RESULTS = "eval_results.json"
A_ZS_TABLE = "zeroshot_results.csv"
A_ZS_GENERATIVE = "zeroshot_generative.csv"   # SQuAD v2 / GSM8K: exact match, F1 (never in the mean)
A_ZS_FIG = "zeroshot_accuracy.png"
A_OFFLINE_TASKS = "offline_tasks"
A_COMPARE_JSON = "comparison.json"
A_COMPARE_MD = "comparison.md"
A_COMPARE_FIG = "comparison.png"
TAG_COMPARED_RUNS = "compared_eval_runs"   # analysis run -> comma-separated eval run ids

# ---- search (sweeps of prune settings: prune_entry/search.py) -------------------------------
TAG_SEARCH_RUN = "search_run_id"           # on each child: the search run that launched it
TAG_SEARCH_POINT = "search_point"          # on prune + eval children: hash of the point's resolved
                                           # PruneConfig (+ model path); resume looks runs up by it
                                           # (dense evals: hash of model path, "dense", eval key)
TAG_SEARCH_EVAL_KEY = "search_eval_key"    # on eval children: hash of the resolved eval flags
M_SEARCH_POINTS = "search/points"          # points in the sweep
M_SEARCH_FINISHED = "search/points_finished"  # finished now or earlier (reused)
M_SEARCH_REUSED = "search/points_reused"   # prune (and eval) taken over from earlier runs
M_SEARCH_FAILED = "search/points_failed"
M_SEARCH_DENSE = "search/dense_evals"     # eval_dense: evals of the unpruned models (one per model)
M_SEARCH_DENSE_FAILED = "search/dense_evals_failed"
M_SEARCH_TIME = "search/time_s"
P_SWEEP = "sweep/{name}"                   # resolved sweep settings (config file + command line)
A_SEARCH_PLAN = "search_plan.json"         # every point: parameters, key, prune / eval flags
A_SEARCH_SUMMARY = "search_summary.csv"    # one row per point, full run ids
A_SEARCH_SUMMARY_MD = "search_summary.md"  # the same as Markdown, with the measurement protocol
A_SEARCH_FIG = "search_ppl_vs_ratio.png"   # perplexity vs achieved ratio per method, per model

# ---- analysis: params read back from runs (dataclass field names of the entry points) -------
P_MODEL = "model"                          # prune: the model as given
P_MODEL_URI = "model_uri"                  # eval / finetune: the model as given
P_METHOD = "method"                        # prune
P_PRUNING_RATIO = "pruning_ratio"          # prune
P_RECONSTRUCT = "reconstruct"              # prune: none | lstsq | bias
P_NUM_FEWSHOT = "num_fewshot"              # eval
P_PPL_SEQ_LEN = "ppl_seq_len"              # eval
P_LIMIT = "limit"                          # eval: docs per task (smoke tests)
P_SPEED_PROTOCOL = "speed_protocol"        # eval
# stage labels of an evaluated model, from the eval run's source_run_id chain
LABEL_DENSE = "dense"                      # eval of a model no run produced
LABEL_PRUNED = "pruned"                    # eval -> prune run
LABEL_PRUNED_LORA = "pruned+LoRA"          # eval -> finetune run -> prune run
LABEL_DENSE_LORA = "dense+LoRA"            # eval -> finetune run of an unpruned model
A_RESULTS_TABLE = "results_table.csv"      # analysis.cross_model: the joined table
A_CROSS_MODEL = "cross_model_{metric}"     # + .md / .tex / .csv / _relative.csv / .png
A_CROSS_MODEL_RELATIVE = "cross_model_{metric}_relative"   # + .csv: the change vs dense, in %
RUN_CROSS_MODEL = "cross_model"            # run name of analysis.cross_model runs
RUN_CONSOLIDATE = "consolidate"            # run name of analysis.consolidate runs
M_N_RESULTS = "n_results"                  # analysis: rows of the joined results table
M_N_MODELS = "n_models"                    # analysis: distinct models in it
A_BASE_INSTRUCT_FIG = "base_vs_instruct_{metric}.png"


RUN_COMPARE = "compare"                    # run name of analysis.compare / prune_entry.compare runs


def compare_metric(index: int, *parts: str) -> str:
    """``pruned_<i>/<measure>[/<key>]``: a comparison of the i-th pruned model (analysis.compare)."""
    return metric_name(f"pruned_{index}", *parts)


def ppl_metric(dataset: str) -> str:
    """``ppl/<dataset>``: the perplexity of one evaluation dataset (sanitised)."""
    return metric_name("ppl", dataset)


def task_metric(task: str, measure: str) -> str:
    """``<task>/<measure>`` for a measure already without the lm-eval filter (``acc_norm``)."""
    return lm_eval_metric(task, f"{measure},none")


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


# ---- robustness (issues 12, 15): liveness tags, reasons, launcher redirect, environment knobs ----
# ---- liveness: who owns a RUNNING run, and is that process still there -----------------------
TAG_HOST = "liveness/host"            # socket.gethostname() of the process that runs the run
TAG_PID = "liveness/pid"              # its PID
TAG_PID_START = "liveness/pid_start"  # its start time (/proc/<pid>/stat field 22, clock ticks after
                                      # boot): a reused PID has another start time
TAG_MACHINE = "liveness/machine"      # "<boot id>:<pid namespace>": where PID + start are meaningful
TAG_HEARTBEAT = "liveness/heartbeat"  # unix seconds of the last heartbeat (a daemon thread)
TAG_CLOSED_BY = "liveness/closed_by"  # on a run closed for its dead process: who closed it and why

# ---- reasons (values of schema.TAG_FAILURE) --------------------------------------------------
REASON_KILLED = "killed"                     # the process died without closing (SIGKILL, OOM, node)
REASON_SIGNAL = "killed by {signal}"         # KILLED by SIGTERM / SIGINT / SIGHUP
REASON_INTERRUPTED = "interrupted by the user"  # a KeyboardInterrupt raised without a signal

# ---- one experiment whichever launcher --------------------------------------------------------
MLFLOW_DEFAULT_EXPERIMENT_ID = "0"    # MLflow's "Default": never where our runs land by default
TAG_LAUNCHER_RUN = "launcher_run_id"  # on a run started under `mlflow run` in Default: the launcher's run
TAG_MOVED_TO = "moved_to_run_id"      # on that launcher run: the run that holds the results
TAG_MOVED_TO_EXPERIMENT = "moved_to_experiment"
TAG_NOTE = "mlflow.note.content"      # the run description shown by the MLflow UI

# ---- environment knobs -------------------------------------------------------------------------
ENV_HEARTBEAT_S = "GQAPRUNE_HEARTBEAT_S"        # heartbeat period (default 30 s)
ENV_STALE_AFTER_S = "GQAPRUNE_STALE_AFTER_S"    # a run on another machine is dead after this long
                                                # without a heartbeat (default 300 s)
ENV_STORE_RETRY_S = "GQAPRUNE_STORE_RETRY_S"    # how long a store write is retried before its data
                                                # is spooled (default 60 s SQLite, 300 s server)
ENV_SPOOL = "GQAPRUNE_SPOOL"                    # spool dir (default <GQAPRUNE_CACHE>/spool)


# ---- params resolved at run time (analysis reads them back) ------------------------------------
P_CALIBRATION_RESOLVED = "calibration_dataset_resolved"   # prune: the source "auto" resolved to
# where each dataset was read from (issue 14: local copies): per dataset name (sanitised)
P_DATA_COPY = "data_copy/{name}"          # local copy path, "hub", "file <path>" or "builtin"
P_DATA_SHA = "data_sha256/{name}"         # content hash of the copy / file (16 hex)
A_DATA_SOURCES = "data_sources.json"      # every DataCopy.to_dict() of the run


def data_params(name: str) -> tuple[str, str]:
    key = metric_name(name.replace("/", "_"))
    return P_DATA_COPY.format(name=key), P_DATA_SHA.format(name=key)


# ---- run names -----------------------------------------------------------------------------------

def run_name(stage: str, model: str, method: str | None = None, ratio: float | None = None) -> str:
    """``<stage>-<model>[-<method>][-<ratio>]``, e.g. ``prune-Llama-taylor-0.35``."""
    parts = [stage, model] + ([method] if method else []) + ([f"{ratio:g}"] if ratio is not None else [])
    return "-".join(parts)


# ---- parsing names back ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Name:
    """A parsed metric / param name: ``group`` (None for run-level scalars) and ``key``."""
    group: str | None
    key: str

    def __str__(self) -> str:
        return self.key if self.group is None else f"{self.group}/{self.key}"


def parse(name: str) -> Name:
    """``ppl/wikitext2`` -> Name("ppl", "wikitext2"); ``achieved_ratio`` -> Name(None, ...)."""
    group, sep, key = name.partition("/")
    return Name(group, key) if sep else Name(None, name)


def ppl_dataset(name: str) -> str | None:
    """The dataset of a ``ppl/<dataset>`` metric name, else None."""
    n = parse(name)
    return n.key if n.group == "ppl" else None


def is_ppl(name: str) -> bool:
    return ppl_dataset(name) is not None


def is_protocol_param(name: str) -> bool:
    """``ppl_protocol/<dataset>`` params (one-line perplexity protocol)."""
    return parse(name).group == parse(P_PPL_PROTOCOL).group


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer family metric (``kept_frac/layer_03`` -> 3), else None."""
    m = re.match(r"^layer_(\d+)", parse(name).key)
    return int(m.group(1)) if m and parse(name).group else None


# MLflow's search_runs DataFrame prefixes columns by kind.
PARAMS_PREFIX, METRICS_PREFIX, TAGS_PREFIX = "params.", "metrics.", "tags."


def param_column(name: str) -> str:
    return PARAMS_PREFIX + name


def metric_column(name: str) -> str:
    return METRICS_PREFIX + name


def tag_column(name: str) -> str:
    return TAGS_PREFIX + name


def split_column(column: str) -> tuple[str | None, str]:
    """``params.x`` -> ("params", "x"); other columns -> (None, column)."""
    for kind in (PARAMS_PREFIX, METRICS_PREFIX, TAGS_PREFIX):
        if column.startswith(kind):
            return kind[:-1], column[len(kind):]
    return None, column


# ---- MLflow's own conventions: logged models and dataset inputs --------------------------------
# A pruned / fine-tuned checkpoint is logged as an MLflow Model named like its artifact
# (A_PRUNED_MODEL / A_FINETUNED_MODEL): it lists under the run's Models, can be registered, and
# ``runs:/<run>/pruned_model`` still downloads the checkpoint directory (plus its MLmodel file).
MODEL_FLAVOR = "gqaprune_checkpoint"         # the flavor key in MLmodel
CTX_CALIBRATION = "calibration"              # dataset input contexts (tag mlflow.data.context)
CTX_RECONSTRUCTION = "reconstruction"
CTX_IMPORTANCE = "importance"                # layer-importance windows (layerwise / blockwise)
CTX_EVALUATION = "evaluation"
CTX_TRAINING = "training"
DATASET_SOURCE_TYPE = "gqaprune_data"        # source type of registered text sources (wikitext2, demo, ...)

# ---- the selection rule and the study analyses (analysis/selection.py, consolidate, cross_model) -
TAG_BEST_RUN = "best_run_id"                 # search: the best point's prune run (one model x ratio)
TAG_BEST_EVAL_RUN = "best_eval_run_id"       # search: the eval run it won with
TAG_BEST_RUN_OF = "best_run_id/{group}"      # search with several (model, ratio) groups: one per group
TAG_BEST_EVAL_RUN_OF = "best_eval_run_id/{group}"
TAG_REGISTERED = "registered_versions"       # analysis: name/version,... of the registered bests
TAG_EXPORTED = "exported_to"                 # analysis: the --export_best directory
P_SELECT_BY = "select_by"                    # analysis / search: the selection rule as given
P_SELECTION_RULE = "selection_rule"          # the rule in words (logged wherever a best is chosen)
A_BEST_CONFIG = "best_config.json"           # search: the best configuration of each (model, ratio)
A_GLOBAL_BEST_CONFIG = "global_best_config.json"   # consolidate: a model's best over every method
A_METHOD_COMPARISON = "method_comparison.json"     # consolidate: per method best / mean / std / n
A_METHOD_TABLE = "method_comparison"         # + .md / .tex / .csv
A_MODEL_RESULTS = "model_results"            # consolidate: every method's results (+ .md/.tex/.csv)
A_ANALYSIS_SUMMARY = "analysis_summary.json"  # cross_model: the five analyses as one JSON
A_STUDY = "study_{name}"                     # cross_model: one analysis (+ .md / .tex / .csv)
A_STUDY_FIG = "study_{name}"                 # cross_model: one figure (+ .png / .pdf)
M_STUDY_MODELS = "study/models"              # models with at least one best configuration
M_STUDY_CANDIDATES = "study/candidates"      # pruned configurations compared
M_STUDY_EXCLUDED = "study/excluded"          # configurations without the selection metric
REGISTERED_MODEL = "gqaprune-{alias}"        # registry name of a model's best pruned checkpoint

# The five analyses of cross_model (names of their tables) and the study figures.
STUDY_BEST = "best_configs"
STUDY_BASE_INSTRUCT = "base_vs_instruct"
STUDY_METHODS = "method_preference"
STUDY_PARAMS = "winning_params"
STUDY_FAMILIES = "family_comparison"
STUDY_ANALYSES = (STUDY_BEST, STUDY_BASE_INSTRUCT, STUDY_METHODS, STUDY_PARAMS, STUDY_FAMILIES)
FIG_BASE_INSTRUCT = "base_vs_instruct_bars"
FIG_PARAMS = "winning_params"
FIG_METHODS = "methods_by_model"
FIG_SCATTER = "acc_vs_ppl"
FIG_KEPT = "kept_by_layer"
STUDY_FIGURES = (FIG_BASE_INSTRUCT, FIG_PARAMS, FIG_METHODS, FIG_SCATTER, FIG_KEPT)


def best_run_tag(group: str, eval_run: bool = False) -> str:
    """``best_run_id/<group>`` (``best_eval_run_id/<group>``); group e.g. ``Llama_0.2``."""
    return (TAG_BEST_EVAL_RUN_OF if eval_run else TAG_BEST_RUN_OF).format(group=metric_name(group).replace("/", "_"))


def best_group_of(tag: str) -> str | None:
    """The group of a per-group best tag (``best_run_id/Llama_0.2`` -> ``Llama_0.2``), else None."""
    n = parse(tag)
    return n.key if n.group in (parse(TAG_BEST_RUN_OF).group, parse(TAG_BEST_EVAL_RUN_OF).group) else None


def study_artifact(name: str, ext: str) -> str:
    """``study_<name>.<ext>`` (ext: md, tex, csv) of one of STUDY_ANALYSES."""
    return f"{A_STUDY.format(name=name)}.{ext}"


def study_figure(name: str, ext: str = "png") -> str:
    return f"{A_STUDY_FIG.format(name=name)}.{ext}"


def registered_model_name(alias: str) -> str:
    """The Model Registry name of an alias' best pruned model (``gqaprune-Llama-Instruct``)."""
    return REGISTERED_MODEL.format(alias=re.sub(r"[^A-Za-z0-9_.-]+", "-", alias).strip("-") or "model")


def zeroshot_task_metrics(task_measures: str | None) -> dict[str, str]:
    """``piqa=acc,hellaswag=acc_norm`` (param task_measures) -> {task: ``<task>/<measure>``}."""
    out = {}
    for item in (task_measures or "").split(","):
        task, eq, measure = item.partition("=")
        if eq and measure and measure != "None":
            out[task] = task_metric(task, measure)
    return out


# ---- metric families and uncertainties, as analysis/ reads them back ------------------------------
def group(template: str) -> str:
    """The family (first path part) of a metric name or template: ``ppl/{dataset}`` -> ``ppl``."""
    return parse(template).group or template


G_PPL, G_NLL, G_PPL_TOKENS, G_PPL_WINDOWS = group(M_PPL), group(M_NLL), group(M_PPL_TOKENS), group(M_PPL_WINDOWS)
G_ZEROSHOT, G_MODEL, G_SPEED = group(M_ZS_MEAN), group(M_MODEL_PARAMS), group(M_SPEED_DECODE)
STDERR_SUFFIX = "_stderr"                  # lm-eval's <measure>_stderr (``piqa/acc_stderr``)


def in_group(name: str, *groups: str) -> bool:
    """Whether metric ``name`` belongs to one of the families ``groups`` (``ppl``, ``zeroshot``, ...)."""
    return parse(name).group in groups


def stderr_metric(metric: str) -> str:
    """``piqa/acc`` -> ``piqa/acc_stderr``: the standard error lm-eval logs beside a task score."""
    return metric + STDERR_SUFFIX


def is_stderr(metric: str) -> bool:
    return metric.endswith(STDERR_SUFFIX)


def dataset_metric(template: str, dataset: str) -> str:
    """``nll/{dataset}`` / ``ppl_tokens/{dataset}`` / ``ppl_windows/{dataset}`` of one dataset."""
    return metric_name(template.format(dataset=dataset))


RATIO_KINDS = {RATIO_STRUCTURED: "structured: fraction of prunable attention+MLP parameters removed",
               RATIO_SPARSITY: "sparsity: fraction of the projection weights set to zero"}
