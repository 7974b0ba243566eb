"""The eval entry point end to end on a tiny model saved to tmp_path, and every bad input."""
import math
import re

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gqaprune import data
from gqaprune.evaluation import zeroshot
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from prune_entry import evaluate
from tracking import runs, schema

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Zoe", "Sam"]
THINGS = ["ball", "kite", "cake", "boat", "hat", "drum", "book", "shell"]


def story(i: int) -> str:
    n, t = NAMES[i % 8], THINGS[(i * 3) % 8]
    return (f"Once upon a time, there was a child named {n}. {n} liked to play with a {t}. "
            f"One day, {n} lost the {t} in the park. {n} looked and looked. At last {n} found the {t}.")


def save_tiny_model(out, texts, with_tokenizer=True, intermediate=64, seed=0):
    """Random tiny GQA Llama (8 heads / 2 KV) + a byte-level BPE trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=4, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(out)
    if with_tokenizer:
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    texts = [story(i) for i in range(120)]
    corpus = root / "stories.txt"
    corpus.write_text("\n\n".join(texts))
    return {"corpus": corpus, "model": save_tiny_model(root / "model", texts),
            "no_tok": save_tiny_model(root / "no_tok", texts, with_tokenizer=False)}


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    """One temporary tracking store and cache for the module; hub switches restored afterwards."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg
    root = tmp_path_factory.mktemp("eval_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("GQAPRUNE_CACHE", str(root / "cache"))
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(var, "1")      # this machine has no hub; go_offline() must not leak
        for mod, attr in ((dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")):
            mp.setattr(mod, attr, getattr(mod, attr))
        data.hub_reachable.cache_clear()
        yield root
    data.hub_reachable.cache_clear()


def last_run():
    runs.setup()
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=1)[0]


def fast(assets, *extra):
    return ["--ppl_datasets", f"st={assets['corpus']}", "--ppl_seq_len", "32", "--speed_prompt_len", "8",
            "--speed_new_tokens", "4", "--speed_repeats", "1", "--batch_size", "4", *extra]


def test_end_to_end_on_a_tiny_model(assets):
    argv = ["--model_uri", str(assets["model"]), *fast(assets, "--tasks", "offline", "--task_corpus",
                                                        f"st={assets['corpus']}", "--limit", "6")]
    assert evaluate.main(argv) == 0
    run = last_run()
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and t[schema.TAG_STAGE] == "eval"
    assert t[schema.TAG_SOURCE_URI] == str(assets["model"])
    # Perplexity equals a direct computation under the logged protocol.
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    model, tok = load_model_and_tokenizer(resolve_model(str(assets["model"])))
    want = perplexity(model, data.eval_stream(tok, str(assets["corpus"]), "test"),
                      PplProtocol("st", "test", 32, None, False), tok.bos_token_id, show_progress=False)
    assert m["ppl/st"] == pytest.approx(want.ppl, rel=1e-9)
    assert m["ppl_tokens/st"] == want.tokens and m["nll/st"] == pytest.approx(math.log(want.ppl), rel=1e-9)
    # the default is the literature's protocol: one stream, non-overlapping windows, no BOS inserted
    assert p["ppl_protocol/st"] == "st [test], 32-token non-overlapping windows, no BOS"
    # Zero-shot: both offline tasks, limit respected, mean uses acc_norm / acc (literature).
    assert p[schema.P_TASK_MEASURES] == "st_continuation=acc_norm,st_cloze=acc"
    assert m["st_continuation/n_samples"] == m["st_cloze/n_samples"] == 6
    assert m[schema.M_ZS_MEAN] == pytest.approx((m["st_continuation/acc_norm"] + m["st_cloze/acc"]) / 2)
    assert m[schema.M_MODEL_PARAMS] == sum(x.numel() for x in model.parameters())
    for key in (schema.M_SPEED_PREFILL, schema.M_SPEED_DECODE, schema.M_SPEED_LATENCY, schema.M_MODEL_DISK_MB):
        assert m[key] > 0
    assert all(re.fullmatch(r"[\w\-. /]+", k) for k in m), "metric names must be valid MLflow names"
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {schema.A_EVAL_RESULTS, schema.A_ZS_TABLE, schema.A_ZS_FIG, schema.A_OFFLINE_TASKS} <= arts


def test_metric_names_round_trip_through_mlflow():
    raw = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.45,
                        "acc_norm_stderr,none": "N/A"},
           "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.3}}
    result = zeroshot.summarize(raw, {"arc_easy": {"effective": 20}})
    with runs.tracked_run("eval") as active:
        evaluate.log_zeroshot(result, "t")
    got = MlflowClient().get_run(active.info.run_id).data
    assert got.metrics == {"arc_easy/acc": 0.5, "arc_easy/acc_stderr": 0.05, "arc_easy/acc_norm": 0.45,
                           "arc_easy/n_samples": 20, "gsm8k/exact_match_strict-match": 0.25,
                           "gsm8k/exact_match_flexible-extract": 0.3, schema.M_ZS_MEAN: 0.5,
                           schema.M_ZS_TASKS: 2}
    assert got.params[schema.P_TASK_MEASURES] == "arc_easy=acc,gsm8k=None"
    from analysis.compare import summary_of_run
    s = summary_of_run(MlflowClient().get_run(active.info.run_id))
    assert s.tasks == {"arc_easy": ("acc", 0.5)} and s.mean_acc == 0.5


def test_run_id_source_is_linked(assets):
    runs.setup()
    with runs.tracked_run("prune", tags={schema.TAG_METHOD: "taylor"}) as src:
        runs.log_dir(assets["model"], schema.A_PRUNED_MODEL)
    assert evaluate.main(["--model_uri", src.info.run_id, *fast(assets, "--tasks", "none", "--speed", "false")]) == 0
    run = last_run()
    assert run.data.tags[schema.TAG_SOURCE_RUN] == src.info.run_id
    assert run.data.tags[schema.TAG_METHOD] == "taylor"
    assert "ppl/st" in run.data.metrics and schema.M_SPEED_DECODE not in run.data.metrics


def test_run_child_is_nested_in_the_active_run(assets):
    with runs.tracked_run("finetune") as parent:
        flags = fast(assets, "--tasks", "none", "--speed", "false")
        child = evaluate.run_child(str(assets["model"]), evaluate.parse(["--model_uri", str(assets["model"]), *flags]))
        assert mlflow.active_run().info.run_id == parent.info.run_id
    c = MlflowClient().get_run(child)
    assert c.data.tags[schema.TAG_PARENT_RUN] == parent.info.run_id
    assert c.info.experiment_id == parent.info.experiment_id and c.info.status == "FINISHED"


def _no_artifact_run() -> str:
    runs.setup()
    with runs.tracked_run("prune") as r:
        pass
    return r.info.run_id


BAD = [
    ("unknown task", lambda a: [str(a["model"]), "--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    ("hub dataset offline", lambda a: [str(a["model"]), "--tasks", "none", "--ppl_datasets", "wikitext2"],
     "hub, which is not reachable (offline)"),
    ("hub task offline", lambda a: [str(a["model"]), "--tasks", "boolq", "--ppl_datasets", "none"],
     "task 'boolq' needs its dataset from the Hugging Face hub"),
    ("run without model", lambda a: [_no_artifact_run(), "--tasks", "none"], "has no model artifact"),
    ("missing tokenizer", lambda a: [str(a["no_tok"]), "--tasks", "none"], "no tokenizer found"),
    ("missing ppl file", lambda a: [str(a["model"]), "--tasks", "none", "--ppl_datasets", "/no/such.txt"],
     "unknown perplexity dataset"),
    ("stride too long", lambda a: [str(a["model"]), "--ppl_stride", "64"], "ppl_stride 64 must be in"),
    ("offline without corpus", lambda a: [str(a["model"]), "--tasks", "offline"], "needs a text corpus"),
    ("unknown flag", lambda a: [str(a["model"]), "--ppl_lenght", "3"], "unrecognized arguments"),
]


@pytest.mark.parametrize("case,argv,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_and_fails_the_run(assets, capsys, case, argv, message):
    args = argv(assets)
    rc = evaluate.main(["--model_uri", args[0], "--speed", "false", *fast(assets)[:4], *args[1:]])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: " in err and message in err.split("error: ", 1)[1]
    run = last_run()
    assert run.info.status == "FAILED" and message in run.data.tags[schema.TAG_FAILURE]


def test_model_facts_and_speed_protocol(assets):
    from gqaprune.evaluation.speed import measure_speed, model_facts
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    model, _ = load_model_and_tokenizer(resolve_model(str(assets["model"])))
    facts = model_facts(model, assets["model"])
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    assert facts.params == n_params and facts.param_bytes == 4 * (n_params + n_buffers)
    assert facts.size_on_disk_bytes == (assets["model"] / "model.safetensors").stat().st_size
    # Prompt + generated tokens stay inside max_position_embeddings (256).
    sp = measure_speed(model, model.config.vocab_size, prompt_len=300, new_tokens=4, repeats=1)
    assert (sp.prompt_len, sp.new_tokens, sp.batch_size, sp.dtype) == (252, 4, 1, "float32")
    assert sp.latency_ms_per_token == pytest.approx(1000 / sp.decode_tokens_per_s)
