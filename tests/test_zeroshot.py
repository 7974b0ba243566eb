"""Zero-shot: score conventions, offline task builder, and real lm-eval runs on local tasks."""
import re

import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.evaluation import tasks as offline
from gqaprune.evaluation import zeroshot

# ---- conventions and the mean (pure) -------------------------------------------------------


@pytest.mark.parametrize("task,available,convention,want", [
    ("hellaswag", ["acc", "acc_norm"], "literature", "acc_norm"),
    ("arc_challenge", ["acc", "acc_norm"], "literature", "acc_norm"),
    ("openbookqa", ["acc", "acc_norm"], "literature", "acc_norm"),
    ("arc_easy", ["acc", "acc_norm"], "literature", "acc"),
    ("piqa", ["acc", "acc_norm"], "literature", "acc"),
    ("boolq", ["acc"], "acc_norm", "acc"),              # falls back when acc_norm is missing
    ("hellaswag", ["acc", "acc_norm"], "acc", "acc"),
    ("piqa", ["acc", "acc_norm"], "acc_norm", "acc_norm"),
    ("x_continuation", ["acc", "acc_norm"], "literature", "acc_norm"),  # via `preferred`
    ("x_cloze", ["acc", "acc_norm"], "literature", "acc"),
    ("gsm8k", [], "literature", None),
])
def test_chosen_measure(task, available, convention, want):
    preferred = {"x_continuation": "acc_norm", "x_cloze": "acc"}
    assert zeroshot.chosen_measure(task, available, convention, preferred) == want


def test_unknown_convention_is_user_error():
    with pytest.raises(UserError, match="acc_convention"):
        zeroshot.chosen_measure("piqa", ["acc"], "best")


RESULTS = {"hellaswag": {"alias": "hellaswag", "acc,none": 0.30, "acc_stderr,none": 0.01,
                         "acc_norm,none": 0.40, "acc_norm_stderr,none": "N/A"},
           "piqa": {"acc,none": 0.60, "acc_norm,none": 0.62},
           "boolq": {"acc,none": 0.70, "sample_len": 3270}}


@pytest.mark.parametrize("convention,want", [("literature", (0.40 + 0.60 + 0.70) / 3),
                                             ("acc", (0.30 + 0.60 + 0.70) / 3),
                                             ("acc_norm", (0.40 + 0.62 + 0.70) / 3)])
def test_summarize_mean(convention, want):
    res = zeroshot.summarize(RESULTS, {"piqa": {"original": 1838, "effective": 100}}, {}, convention)
    assert res.mean == pytest.approx(want, abs=1e-15)
    by = {s.task: s for s in res.scores}
    assert by["piqa"].n_samples == 100 and by["boolq"].n_samples is None
    assert by["hellaswag"].acc_norm_stderr is None and by["hellaswag"].acc_stderr == 0.01
    assert by["boolq"].chance == 0.5


def test_groups_count_once():
    results = {"ai2_arc": {"acc,none": 0.5}, "arc_easy": {"acc,none": 0.6}, "arc_challenge": {"acc,none": 0.4},
               "piqa": {"acc,none": 0.7}}
    res = zeroshot.summarize(results, group_subtasks={"ai2_arc": ["arc_easy", "arc_challenge"]})
    assert [s.task for s in res.scores] == ["ai2_arc", "piqa"]
    assert res.mean == pytest.approx(0.6)


def test_numeric_results_keep_lm_eval_keys():
    assert zeroshot.numeric_results(RESULTS)["hellaswag"] == {
        "acc,none": 0.30, "acc_stderr,none": 0.01, "acc_norm,none": 0.40}


# ---- offline task builder ------------------------------------------------------------------

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Zoe", "Sam"]
THINGS = ["ball", "kite", "cake", "boat", "hat", "drum", "book", "shell"]
PLACES = ["park", "garden", "forest", "beach", "house", "river"]


def story(i: int) -> str:
    n, t, p = NAMES[i % 8], THINGS[(i * 3) % 8], PLACES[(i * 5) % 6]
    return (f"Once upon a time, there was a child named {n}. {n} liked to play in the {p}. "
            f"One day, {n} found a red {t} near a tree. It was the best day ever. "
            f"{n} took the {t} home and showed it to mom.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n\n".join(story(i) for i in range(120)))
    return path


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_continuation_items_reassemble_the_passage(corpus):
    paras = offline.corpus_paragraphs(str(corpus), "validation")
    assert len(paras) == 12                                   # every 10th of 120 paragraphs
    items = offline.continuation_items(paras, 4, seed=0, max_items=100)
    assert len(items) == 12
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert _norm(it["query"] + " " + it["choices"][it["gold"]]) == _norm(paras[it["source"]])
    assert offline.continuation_items(paras, 4, 0, 100) == items          # deterministic
    assert [i["gold"] for i in offline.continuation_items(paras, 4, 1, 100)] != [i["gold"] for i in items]


def test_cloze_items_need_the_context(corpus):
    paras = offline.corpus_paragraphs(str(corpus), "validation")
    items = offline.cloze_items(paras, 4, seed=0, max_items=100)
    assert len(items) == 12
    for it in items:
        word = it["choices"][it["gold"]]
        assert paras[it["source"]].startswith(it["query"] + " " + word)
        assert re.search(rf"\b{word}\b", it["query"])             # answer occurs in the context
        for d in it["choices"]:
            if d != word:                                          # distractors do not
                assert not re.search(rf"\b{d}\b", it["query"], re.I)


def test_build_tasks_writes_lm_eval_tasks_and_reuses_them(corpus, tmp_path):
    specs = [offline.OfflineTask("st_continuation", str(corpus)), offline.OfflineTask("st_cloze", str(corpus))]
    root, infos = offline.build_tasks(specs, tmp_path)
    assert [i["name"] for i in infos] == ["st_continuation", "st_cloze"]
    assert [i["preferred_measure"] for i in infos] == ["acc_norm", "acc"]
    assert {p.name for p in root.iterdir()} == {"manifest.json", "st_continuation.yaml", "st_continuation.jsonl",
                                                "st_continuation_fewshot.jsonl", "st_cloze.yaml", "st_cloze.jsonl",
                                                "st_cloze_fewshot.jsonl"}
    stamp = (root / "st_cloze.jsonl").stat().st_mtime_ns
    again, _ = offline.build_tasks(specs, tmp_path)
    assert again == root and (root / "st_cloze.jsonl").stat().st_mtime_ns == stamp
    manager = zeroshot.task_manager([root], with_defaults=False)
    assert {"st_continuation", "st_cloze"} <= set(manager.all_tasks)
    loaded = manager.load(["st_cloze"])["tasks"]
    task = next(iter(loaded.values()))
    assert len(list(task.test_docs())) == infos[1]["items"] == 12


def test_offline_names():
    assert offline.split_name("tiny_stories_cloze") == ("tiny_stories", "cloze")
    assert offline.is_offline_name("demo_continuation") and not offline.is_offline_name("_cloze")
    with pytest.raises(UserError, match="offline task"):
        offline.split_name("piqa")


# ---- real lm-eval on a local task whose right answer is constructed to be likelier ----------

WORDS = ["a", "b", "x", "y", "z"]


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def always_x_model(tok):
    """A Llama whose next-token distribution is ~one-hot on 'x' at every position.

    Attention and MLP outputs are zeroed (residual = embedding), every embedding is the same
    all-ones vector (RMSNorm keeps it), and only the lm_head row of 'x' is non-zero:
    logit(x) = 4 * hidden = 64, every other logit 0.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("x")] = 4.0
    return model


def test_likelier_answer_gives_accuracy_one(tmp_path):
    tok = word_tokenizer()
    model = always_x_model(tok)
    docs = [{"query": "a b a", "choices": ["y y", "x x x", "z"], "gold": 1},
            {"query": "b", "choices": ["x", "y", "z z"], "gold": 0},
            {"query": "a a", "choices": ["z y", "y", "x x"], "gold": 2}]
    offline.write_task_files("likely", docs, docs[:1], tmp_path)
    # Negative control: the same docs with a wrong gold must score 0.
    wrong = [{**d, "gold": (d["gold"] + 1) % len(d["choices"])} for d in docs]
    offline.write_task_files("unlikely", wrong, wrong[:1], tmp_path)
    manager = zeroshot.task_manager([tmp_path], with_defaults=False)
    zeroshot.check_tasks(manager, ["likely", "unlikely"])
    res = zeroshot.evaluate_tasks(model, tok, ["likely", "unlikely"], manager, batch_size=2)
    by = {s.task: s for s in res.scores}
    assert (by["likely"].acc, by["likely"].acc_norm, by["likely"].n_samples) == (1.0, 1.0, 3)
    assert (by["unlikely"].acc, by["unlikely"].acc_norm) == (0.0, 0.0)
    assert res.mean == 0.5


def test_unknown_task_is_user_error(tmp_path):
    offline.write_task_files("mytask", [{"query": "a", "choices": ["x", "y"], "gold": 0}], [], tmp_path)
    manager = zeroshot.task_manager([tmp_path], with_defaults=False)
    with pytest.raises(UserError, match="unknown task 'mytaks'.*did you mean mytask"):
        zeroshot.check_tasks(manager, ["mytaks"])


def test_hub_task_offline_fails_fast_with_hint(monkeypatch):
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg
    for mod, attr in ((dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(mod, attr, getattr(mod, attr))   # restored after the test
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    zeroshot.go_offline()
    manager = zeroshot.task_manager([], with_defaults=True)
    with pytest.raises(UserError, match=r"task 'boolq' needs its dataset .*offline.*--tasks offline"):
        zeroshot.check_tasks(manager, ["boolq"])


def test_accuracy_figure_shows_the_standard_error_of_the_scored_measure_inside_the_canvas():
    from gqaprune.evaluation.zeroshot import TaskScore, ZeroShotResult, accuracy_figure, score_stderr
    scores = [TaskScore("piqa", "acc_norm", 0.61, acc=0.58, acc_norm=0.61, acc_stderr=0.011,
                        acc_norm_stderr=0.012, chance=0.5),
              TaskScore("boolq", "acc", 0.7, acc=0.7, acc_stderr=0.02, chance=0.5),
              TaskScore("demo_cloze", "acc", 0.3, acc=0.3, chance=0.25)]          # no stderr given
    assert [score_stderr(s) for s in scores] == [0.012, 0.02, None]
    fig = accuracy_figure(ZeroShotResult(scores, 0.5367, "acc_norm where defined", 0, None), "Llama · taylor 20%")
    ax = fig.axes[0]
    caps = [c for c in ax.containers if hasattr(c, "errorbar") and c.errorbar is not None]
    (bars,) = caps
    segments = bars.errorbar.lines[2][0].get_segments()          # one vertical segment per bar
    assert [round(float(s[1][1] - s[0][1]) / 2, 6) for s in segments] == [0.012, 0.02, 0.0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.610\n± 0.012", "0.700\n± 0.020", "0.300"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    for artist in [*ax.texts, ax.title, ax.get_legend(), *ax.get_xticklabels()]:
        box = artist.get_window_extent(renderer)
        assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1 and canvas.y0 - 1 <= box.y0 and box.y1 <= canvas.y1 + 1
    import matplotlib.pyplot as plt
    plt.close(fig)
