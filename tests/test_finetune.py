"""LoRA fine-tuning core: exact templates and masks, data forms, one-step descent, merge, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GQA_SHAPES, make_tiny_model, make_word_tokenizer
from gqaprune import checkpoint
from gqaprune import finetune as ft
from gqaprune.errors import UserError
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import model_shapes
from gqaprune.templates import TEMPLATES, get_template, render

IGN = ft.IGNORE


# ------------------------------------------------------------------------------ helpers

def pruned_tiny(family="llama", n_heads=8, n_kv=2, seed=0):
    """A tiny model pruned non-uniformly: every layer keeps a different number of KV groups/channels."""
    model = make_tiny_model(family, n_heads, n_kv, layers=3, seed=seed)
    shapes = model_shapes(model)
    layers = [LayerPlan(list(range(max(1, s.n_kv - i))), list(range(0, s.intermediate - 7 * (i + 1))))
              for i, s in enumerate(shapes)]
    apply_plan(model, PruningPlan("tiny", "manual", 0.3, shapes, layers))
    return model


def model_for(case):
    family, heads, kv, pruned = case
    return pruned_tiny(family, heads, kv) if pruned else make_tiny_model(family, heads, kv)


CASES = [(f, h, kv, False) for f, h, kv in GQA_SHAPES] + [("llama", 8, 2, True), ("qwen2", 8, 2, True),
                                                           ("mistral", 4, 4, True)]
CASE_IDS = [f"{f}-{h}/{kv}{'-pruned' if p else ''}" for f, h, kv, p in CASES]


@pytest.fixture
def tok(tmp_path):
    return make_word_tokenizer(tmp_path / "tok")


def random_examples(n, length, seed=0, prompt_len=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = [1] + torch.randint(4, 97, (length - 1,), generator=gen).tolist()
        labels = [IGN] * (1 + prompt_len) + ids[1 + prompt_len:]
        out.append(ft.Encoded(tuple(ids), tuple(labels)))
    return out


def fixed_data(train, val=None):
    return ft.FinetuneData("text", TEMPLATES["text"], train, val if val is not None else train,
                           "test", 0, "")


# ------------------------------------------------------------------------------ templates

def test_alpaca_template_renders_exactly_with_and_without_input():
    tpl = get_template("auto", "instruction")
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt, response = render(tpl, rec, "instruction")
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                      "further context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert response == "5"
    prompt, response = render(tpl, {**rec, "input": "  "}, "instruction")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n")


def test_qa_template_and_alpaca_view_of_qa_records():
    rec = {"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"}
    assert render(get_template("auto", "qa"), rec, "qa") == (
        "Paris is in France.\nQuestion: Where is Paris?\nAnswer:", " France")
    prompt, response = render(get_template("alpaca", "qa"), rec, "qa")
    assert prompt.endswith("### Instruction:\nWhere is Paris?\n\n### Input:\nParis is in France.\n\n### Response:\n")
    assert response == "France"
    assert render(get_template("auto", "text"), {"text": "a b {c}"}, "text") == ("", "a b {c}")


def test_chat_template_uses_the_tokenizers_own_turns(tok):
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert render(get_template("chat", "instruction"), rec, "instruction", tok) == (
        "<|user|>Say hi.<|end|><|assistant|>", "hi<|end|>")
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        render(get_template("chat", "instruction"), rec, "instruction", tok)


@pytest.mark.parametrize("name,form", [("qa", "instruction"), ("text", "qa"), ("alpaca", "text"), ("nope", "text")])
def test_template_that_does_not_fit_the_form_is_refused(name, form):
    with pytest.raises(UserError, match=name):
        get_template(name, form)


# ------------------------------------------------------------------------------ tokenization

def test_response_only_labels_mask_exactly_the_prompt(tok):
    # word ids: w5 -> 9 ... (4 specials first); BOS=1, EOS=2
    enc = ft.encode(tok, "w5 w6 w7", " w8 w9", seq_len=64)
    assert enc.input_ids == (1, 9, 10, 11, 12, 13, 2)
    assert enc.labels == (IGN, IGN, IGN, IGN, 12, 13, 2)
    assert enc.n_targets == 3
    with_prompt = ft.encode(tok, "w5 w6 w7", " w8 w9", seq_len=64, train_on_prompt=True)
    assert with_prompt.labels == (IGN, 9, 10, 11, 12, 13, 2)
    assert ft.encode(tok, "w5 w6 w7", " w8 w9", seq_len=5).labels == (IGN, IGN, IGN, IGN, 12)
    assert ft.encode(tok, "w5 w6 w7", " w8 w9", seq_len=4) is None  # no target survives truncation
    chat = ft.encode(tok, "w5", " w6", seq_len=64, add_special_tokens=False)
    assert chat.input_ids == (9, 10) and chat.labels == (IGN, 10)


def test_token_spanning_the_prompt_boundary_is_a_target():
    """BPE can merge the prompt's last and the response's first character into one token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5}
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [("a", "b")])),
                                  bos_token="<s>", eos_token="</s>")
    enc = ft.encode(bpe, "ca", "b", seq_len=16)
    assert enc.input_ids == (0, 4, 5, 1)
    assert enc.labels == (IGN, IGN, 5, 1)


def test_pack_text_makes_bos_prefixed_blocks_of_every_token(tok):
    blocks = ft.pack_text(tok, ["w1 w2 w3", "w4 w5 w6 w7"], seq_len=4)
    assert [b.input_ids for b in blocks] == [(1, 5, 6, 7), (1, 8, 9, 10)]   # tail (w7) dropped
    assert [b.labels for b in blocks] == [(IGN, 5, 6, 7), (IGN, 8, 9, 10)]
    assert [b.input_ids for b in ft.pack_text(tok, ["w1 w2"], seq_len=8)] == [(1, 5, 6)]


def test_collate_pads_right_and_loss_ignores_padding(tok):
    model = make_tiny_model("llama", 4, 4)
    a, b = random_examples(1, 9, seed=1, prompt_len=2)[0], random_examples(1, 5, seed=2)[0]
    batch = ft.collate([a, b], pad_id=0)
    assert batch["input_ids"][1].tolist() == list(b.input_ids) + [0] * 4
    assert batch["labels"][1, 5:].tolist() == [IGN] * 4
    assert batch["attention_mask"].sum(1).tolist() == [9, 5]
    joint, n = ft.nll_sum(model, batch)
    sa, na = ft.nll_sum(model, ft.collate([a], 0))
    sb, nb = ft.nll_sum(model, ft.collate([b], 0))
    assert n == na + nb == (9 - 3) + (5 - 1)
    assert torch.allclose(joint, sa + sb, rtol=1e-5)


# ------------------------------------------------------------------------------ datasets

def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def test_local_alpaca_jsonl_is_read_and_every_10th_record_held_out(tmp_path):
    recs = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(20)]
    out = ft.load_records(write_jsonl(tmp_path / "d.jsonl", recs))
    assert out.form == "instruction"
    assert [r["instruction"] for r in out.records] == [f"q{i}" for i in range(20) if i % 10 != 9]


def test_squad_forms_nested_json_answers_dict_and_answer_string(tmp_path):
    nested = {"data": [{"paragraphs": [{"context": "C", "qas": [
        {"question": "Q1", "answers": [{"text": "A1", "answer_start": 0}]},
        {"question": "Q2", "answers": []}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(nested))
    out = ft.load_records(str(tmp_path / "s.json"))
    assert out.form == "qa" and out.records == [{"context": "C", "question": "Q1", "answer": "A1"}]
    assert out.skipped == 1  # unanswerable question: nothing to learn
    flat = [{"context": "C", "question": "Q", "answers": {"text": ["A"], "answer_start": [0]}},
            {"context": "D", "question": "R", "answer": "B"}]
    out = ft.records_of(flat, "x")
    assert [r["answer"] for r in out.records] == ["A", "B"]


@pytest.mark.parametrize("records,match", [
    ([{"instruction": "x", "input": ""}], "lacks field 'output'.*Alpaca form"),
    ([{"context": "c", "answer": "a"}], "lacks field 'question'.*SQuAD form"),
    ([{"question": "q", "context": "c"}], "lacks field 'answers'"),
    ([{"prompt": "p", "completion": "c"}], r"fields \['completion', 'prompt'\].*Alpaca form"),
    ([{"instruction": "x", "output": "y"}, {"text": "t"}], "record 2 .* lacks field 'instruction'"),
    ([], "empty"),
    ([{"instruction": "x", "output": " "}], "no record with a non-empty target"),
])
def test_wrong_fields_name_the_missing_field_and_the_expected_form(tmp_path, records, match):
    with pytest.raises(UserError, match=match):
        ft.load_records(write_jsonl(tmp_path / "bad.jsonl", records))


def test_unknown_dataset_and_offline_hub_fail_fast():
    with pytest.raises(UserError, match="unknown dataset"):
        ft.load_records("no-such-set")
    with pytest.raises(UserError, match="hub.*not reachable"):
        ft.load_records("alpaca")   # HF_DATASETS_OFFLINE is set by conftest


@pytest.mark.parametrize("n,samples,frac,expected", [
    (100, None, 0.05, (95, 5)), (100, None, 0.0, (100, 0)), (100, 20, 0.2, (20, 5)),
    (10, 50, 0.1, (4, 6)), (3, None, 0.01, (2, 1))])
def test_split_sizes(n, samples, frac, expected):
    assert ft.split_sizes(n, samples, frac) == expected


def test_build_data_is_seeded_and_disjoint(tok, text_file):
    recs = ft.load_records(str(text_file))
    a = ft.build_data(tok, recs, seq_len=16, finetune_samples=10, val_fraction=0.2, seed=3)
    b = ft.build_data(tok, recs, seq_len=16, finetune_samples=10, val_fraction=0.2, seed=3)
    assert a.train == b.train and len(a.train) == 10 and len(a.val) == 2
    assert not set(a.train) & set(a.val)
    assert ft.build_data(tok, recs, seq_len=16, finetune_samples=10, seed=4).train != a.train


# ------------------------------------------------------------------------------ LoRA

def test_target_modules_short_names_groups_and_unknown():
    model = make_tiny_model("llama", 4, 4)
    assert ft.resolve_targets(model, "q,k,v,o,gate,up,down") == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]
    assert ft.resolve_targets(model, "mlp,q_proj") == ["gate_proj", "up_proj", "down_proj", "q_proj"]
    with pytest.raises(UserError, match="c_attn not found.*q_proj"):
        ft.resolve_targets(model, "q,c_attn")


def test_lr_schedule_warmup_then_linear_decay():
    s = ft.TrainingConfig(learning_rate=1.0, warmup_ratio=0.2)
    assert [ft.lr_at(i, 10, s) for i in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


def test_micro_batches_cover_each_epoch_once():
    s = ft.TrainingConfig(batch_size=2, gradient_accumulation=2, seed=1)
    steps = [ft.micro_batches(10, i, s) for i in range(3)]   # 3 steps per epoch: 4 + 4 + 2
    assert [len(sum(b, [])) for b in steps] == [4, 4, 2]
    assert sorted(sum(sum(steps, []), [])) == list(range(10))
    assert sum(ft.micro_batches(10, 3, s), []) != sum(steps[0], [])  # epoch 2 reshuffles


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_lora_step_lowers_the_loss_and_merge_equals_base_plus_adapter(case, tmp_path):
    torch.manual_seed(0)
    peft_model = ft.attach_lora(model_for(case), ft.LoraConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    batch = random_examples(4, 12, seed=5, prompt_len=3)
    res = ft.train(peft_model, fixed_data(batch), ft.TrainingConfig(learning_rate=1e-2, max_steps=1,
                   batch_size=4, warmup_ratio=0, progress=False), pad_id=0)
    before, after = (r.val_loss for r in res.history.val)
    assert res.history.train[0].train_loss == pytest.approx(before, rel=1e-5)  # same batch
    assert after < before
    # merged weights are W + (alpha / r) B A, and the outputs agree
    lora_q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected_w = lora_q.base_layer.weight + 2.0 * lora_q.lora_B["default"].weight @ lora_q.lora_A["default"].weight
    ids = ft.collate(batch, 0)["input_ids"]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = ft.merge(peft_model)
        assert type(merged).__name__.endswith("ForCausalLM") and not hasattr(merged, "peft_config")
        assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected_w.detach(), atol=1e-6)
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
        checkpoint.save_model(merged, None, tmp_path / "m")
        reloaded = checkpoint.load_model(tmp_path / "m")
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)


def test_pruned_merged_model_loads_with_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM
    peft_model = ft.attach_lora(pruned_tiny("qwen2", 8, 2), ft.LoraConfig(lora_r=2, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)   # a non-zero adapter
    ids = torch.randint(4, 97, (2, 9))
    with torch.no_grad():
        adapted = peft_model.eval()(input_ids=ids).logits
    info = checkpoint.save_model(ft.merge(peft_model), None, tmp_path / "m")
    assert info["format"] == "remote_code"
    hub = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(hub(input_ids=ids).logits, adapted, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    """Micro-batches of unequal target counts: the step's gradient is still the token mean."""
    torch.manual_seed(0)
    m = ft.attach_lora(make_tiny_model("llama", 8, 2), ft.LoraConfig(lora_r=2, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)   # so lora_A gets a gradient too
    examples = random_examples(4, 10, seed=7, prompt_len=2) + random_examples(4, 6, seed=8)
    n_tokens = sum(e.n_targets for e in examples)
    grads = []
    for size in (8, 4, 2):
        batches = [ft.collate(examples[i:i + size], 0) for i in range(0, 8, size)]
        total = ft.accumulate_gradients(m, batches, n_tokens)
        grads.append(torch.cat([p.grad.flatten() for _, p in ft.trainable_parameters(m)]))
        m.zero_grad()
        assert total == pytest.approx(float(ft.nll_sum(m, ft.collate(examples, 0))[0].detach()), rel=1e-5)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and torch.allclose(grads[0], grads[2], atol=1e-7)


# ------------------------------------------------------------------------------ resume

def _run(store, stop_at=None, raise_at=None, resume=False):
    """Train 6 steps (2 epochs of 3) with dropout (so RNG state matters); optionally interrupt."""
    torch.manual_seed(0)
    model = ft.attach_lora(pruned_tiny("llama", 8, 2), ft.LoraConfig(lora_r=2, lora_dropout=0.2))
    data = fixed_data(random_examples(6, 10, seed=1, prompt_len=2), random_examples(2, 10, seed=2))
    settings = ft.TrainingConfig(learning_rate=5e-3, epochs=2, batch_size=2, checkpoint_every=2,
                                seed=0, progress=False)
    steps_seen = []

    def on_step(rec):
        steps_seen.append(rec.step)
        if raise_at is not None and rec.step == raise_at:
            raise KeyboardInterrupt   # a kill between checkpoints
    cb = ft.Callbacks(on_step=on_step, should_stop=(lambda s: s == stop_at) if stop_at else None)
    state = store.load() if resume else None
    res = ft.train(model, data, settings, 0, store, state, cb, meta={"run_id": "r"})
    return res, torch.cat([p.detach().flatten() for _, p in ft.trainable_parameters(model)]), steps_seen


def test_graceful_stop_checkpoints_and_resume_continues_from_that_step(tmp_path):
    full, w_full, _ = _run(ft.CheckpointStore(tmp_path / "a"))
    store = ft.CheckpointStore(tmp_path / "b")
    part, _, _ = _run(store, stop_at=4)
    assert not part.completed and part.final_step == 4 and store.meta()["step"] == 4
    resumed, w_res, seen = _run(store, resume=True)
    assert resumed.start_step == 4 and resumed.resumed and resumed.completed
    assert seen == [1, 2, 3, 4, 5, 6]     # history replayed, then steps 5 and 6 trained
    assert torch.equal(w_res, w_full)
    assert resumed.history == full.history


def test_kill_between_checkpoints_resumes_from_the_last_one(tmp_path):
    full, w_full, _ = _run(ft.CheckpointStore(tmp_path / "a"))
    store = ft.CheckpointStore(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        _run(store, raise_at=3)
    assert store.load()["step"] == 2        # checkpoint_every=2: step 3 was lost
    resumed, w_res, _ = _run(store, resume=True)
    assert resumed.start_step == 2 and resumed.final_step == 6
    assert torch.equal(w_res, w_full)
    assert [r.train_loss for r in resumed.history.train] == [r.train_loss for r in full.history.train]
    assert [r.step for r in resumed.history.val] == [0, 3, 6]


def test_checkpoint_of_another_setup_is_refused(tmp_path):
    store = ft.CheckpointStore(tmp_path / "c")
    _run(store, stop_at=2)
    torch.manual_seed(0)
    model = ft.attach_lora(pruned_tiny("llama", 8, 2), ft.LoraConfig(lora_r=2))
    with pytest.raises(UserError, match="different training setup"):
        ft.train(model, fixed_data(random_examples(6, 10)), ft.TrainingConfig(epochs=3, batch_size=2,
                 progress=False), 0, store, store.load())


def test_training_curves_figure_has_both_panels():
    fig = ft.training_curves_figure(ft.History(
        [ft.StepRecord(1, 0, 1e-3, 2.0, 10), ft.StepRecord(2, 0, 5e-4, 1.5, 10)],
        [ft.ValRecord(0, 0.0, 2.1), ft.ValRecord(2, 1.0, 1.6)]), "t")
    loss_ax, lr_ax = fig.axes
    assert [len(line.get_xdata()) for line in loss_ax.lines] == [2, 2]
    assert list(lr_ax.lines[0].get_ydata()) == [1e-3, 5e-4]
    assert math.isclose(loss_ax.lines[1].get_ydata()[1], 1.6)


def test_gradient_checkpointing_changes_memory_not_results():
    data = fixed_data(random_examples(4, 12, seed=3, prompt_len=2))
    histories = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = ft.attach_lora(pruned_tiny("mistral", 8, 2), ft.LoraConfig(lora_r=2, lora_dropout=0.0), gradient_checkpointing=ckpt)
        assert m.base_model.model.is_activation_checkpointing == ckpt
        res = ft.train(m, data, ft.TrainingConfig(learning_rate=1e-2, max_steps=2, batch_size=2,
                       progress=False), pad_id=0)
        histories.append([r.train_loss for r in res.history.train] + [r.val_loss for r in res.history.val])
        merged = ft.merge(m)
        assert not getattr(merged, "is_activation_checkpointing", False) and merged.config.use_cache
    assert histories[0] == pytest.approx(histories[1], rel=1e-5)


# ------------------------------------------------------------------------------ config tree

@pytest.mark.parametrize("alias,expected", [("demo", "demo"), ("Llama", "alpaca")])
def test_auto_dataset_is_the_demo_corpus_only_for_the_demo_model(alias, expected):
    assert ft.DataConfig(dataset="auto").source(alias) == expected
    assert ft.DataConfig(dataset="squad").source(alias) == "squad"


@pytest.mark.parametrize("values,match", [
    ({"lora_r": 0}, r"^lora_r must be >= 1, got 0; pass e\.g\. 8$"),
    ({"lora_alpha": 0.0}, r"^lora_alpha must be > 0, got 0\.0; pass e\.g\. 16$"),
    ({"lora_dropout": 1.0}, r"^lora_dropout must be in \[0, 1\), got 1\.0; pass e\.g\. 0\.05$"),
    ({"learning_rate": 0.0}, r"^learning_rate must be > 0, got 0\.0; pass e\.g\. 1e-4$"),
    ({"epochs": 0}, r"^epochs must be >= 1, got 0; pass a positive epochs$"),
    ({"checkpoint_every": 0}, r"^checkpoint_every must be >= 1, got 0; pass a positive checkpoint_every$"),
    ({"max_steps": 0}, r"^max_steps must be >= 1 or none, got 0; pass a positive max_steps$"),
    ({"finetune_samples": 0}, r"^finetune_samples must be >= 1 or none, got 0"),
    ({"seq_len": 1}, r"^seq_len must be >= 2, got 1; pass e\.g\. 256$"),
    ({"val_fraction": 1.0}, r"^val_fraction must be in \[0, 1\), got 1\.0"),
    ({"warmup_ratio": 1.0}, r"^warmup_ratio must be in \[0, 1\), got 1\.0"),
    ({"resume": "maybe"}, r"^resume must be one of auto, true, false, got 'maybe'; pass auto, true or false$"),
    ({"template": "nope"}, r"^unknown template 'nope'; use auto or one of alpaca, chat, qa, text$"),
    ({"target_modules": " , "}, r"^target_modules is empty"),
    ({"dataset": "no-such-set"}, r"^unknown dataset 'no-such-set'; use auto, one of .*alpaca.*squad.*wikitext2"),
    ({"keep_mask": "maybe"}, r"^unknown keep_mask 'maybe'; use one of auto, true, false$"),
])
def test_every_flag_is_checked_when_the_tree_is_built(values, match):
    from gqaprune.config import build
    with pytest.raises(UserError, match=match):
        build(ft.FinetuneConfig, values)


def test_trajectory_holds_exactly_the_settings_that_change_training():
    from gqaprune.config import build, leaves
    cfg = ft.FinetuneConfig()
    assert set(cfg.trajectory()) == {
        "template", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "epochs",
        "finetune_samples", "seq_len", "batch_size", "gradient_accumulation", "seed", "val_fraction",
        "train_on_prompt", "dtype", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm"}
    # where it runs, how it is logged / saved, and the mask do not change the key
    moved = build(ft.FinetuneConfig, {"device": "cpu", "checkpoint_every": 3, "progress": False,
                                      "gradient_checkpointing": True, "keep_mask": "false", "eval_after": True,
                                      "output_dir": "x", "resume": "false"})
    assert moved.trajectory() == cfg.trajectory()
    assert build(ft.FinetuneConfig, {"lora_r": 4}).trajectory() != cfg.trajectory()
    assert len({leaf.name for leaf in leaves(ft.FinetuneConfig)}) == len(leaves(ft.FinetuneConfig))


# ------------------------------------------------------------------------------ record sources

def test_record_sources_are_the_data_registry_and_load_records_uses_it(monkeypatch):
    from gqaprune import data
    from gqaprune.datadir import DataCopy
    from gqaprune.registry import Registry
    assert {"alpaca", "alpaca-cleaned", "yahma/alpaca-cleaned", "squad"} <= set(data.RECORD_SOURCES)
    assert data.RECORD_SOURCES.get("alpaca").form == "instruction" and data.RECORD_SOURCES.get("squad").form == "qa"
    assert data.RECORD_SOURCES.get("alpaca") is data.RECORD_SOURCES.get("yahma/alpaca-cleaned")

    class Fixed(data.RecordSource):
        def load(self, name, data_dir=None):
            return [{"context": "C", "question": "Q", "answers": {"text": ["A"]}}], DataCopy(self.ref, "hub")
    reg = Registry("dataset")
    reg.register("tiny-qa", Fixed("me/tiny-qa", "qa", "train", "one record"))
    monkeypatch.setattr(data, "RECORD_SOURCES", reg)
    out = ft.load_records("tiny-qa")
    assert (out.form, out.records, out.source) == ("qa", [{"context": "C", "question": "Q", "answer": "A"}],
                                                   "me/tiny-qa [train]")
    assert [c.origin for c in out.copies] == ["hub"]
    with pytest.raises(UserError, match="use one of .*tiny-qa"):
        ft.load_records("no-such-set")


def test_typed_stats_and_history_round_trip(tok, text_file):
    fdata = ft.build_data(tok, ft.load_records(str(text_file)), seq_len=16, finetune_samples=10, val_fraction=0.2)
    assert fdata.stats() == ft.DataStats(10, 2, 0, sum(e.n_targets for e in fdata.train))
    h = ft.History([ft.StepRecord(1, 0, 1e-3, 2.5, 40)], [ft.ValRecord(0, 0.0, 3.0), ft.ValRecord(1, 1.0, 2.0)])
    assert ft.History.from_dict(h.to_dict()) == h
    assert h.to_dict()["train"] == [{"step": 1, "epoch": 0, "lr": 1e-3, "train_loss": 2.5, "tokens": 40}]


# ------------------------------------------------------------------------------ sparse models: the mask

def zero_share(model, layer, proj, share):
    """Zero the first ``share`` of the weights (row-major) of one projection; returns the count."""
    from gqaprune import arch
    lin = dict(arch.named_linears(arch.decoder_layers(model)[layer]))[proj]
    n = round(share * lin.weight.numel())
    with torch.no_grad():
        lin.weight.view(-1)[:n] = 0
    return n, sum(lin.weight.numel() for layer_ in arch.decoder_layers(model) for _, lin in arch.named_linears(layer_))


@pytest.mark.parametrize("share,keep_mask,kept", [
    (0.0, "auto", False), (0.005, "auto", False), (0.01, "auto", True), (0.5, "auto", True),
    (0.0, "true", True), (0.5, "false", False)])
def test_zero_pattern_is_kept_for_sparse_models(share, keep_mask, kept):
    model = make_tiny_model("llama", 8, 2, layers=2)
    n, total = zero_share(model, 1, "mlp.up_proj", share)
    pattern = ft.zero_pattern(model, keep_mask)
    assert pattern.kept == kept
    assert pattern.sparsity == n / total                        # exact: zeros / weights of the 7 projections
    assert pattern.max_share == pytest.approx(share, abs=1e-3)
    if kept:
        assert int(sum((~m).sum() for m in pattern.masks.values())) == n


def sparse_tiny(family, n_heads, n_kv):
    from gqaprune.sparsity import SparsityConfig, sparsify
    model = make_tiny_model(family, n_heads, n_kv, layers=2)
    sparsify(model, None, SparsityConfig(method="magnitude_unstructured", sparsity=0.5), progress=False)
    return model


@pytest.mark.parametrize("family,n_heads,n_kv", [("llama", 8, 2), ("qwen2", 8, 2), ("mistral", 8, 1)])
def test_merge_keeps_the_zero_pattern_of_a_sparse_model(family, n_heads, n_kv):
    from gqaprune.config import build
    from gqaprune.sparsity import weight_masks
    model = sparse_tiny(family, n_heads, n_kv)
    masks = weight_masks(model)
    cfg = build(ft.FinetuneConfig, {"lora_r": 4, "lora_dropout": 0.0, "learning_rate": 1e-2, "max_steps": 2,
                                    "batch_size": 4, "progress": False})
    torch.manual_seed(0)
    prep = ft.prepare(model, cfg)
    assert prep.zeros.kept and prep.zeros.sparsity == pytest.approx(0.5, abs=0.01)
    data = fixed_data(random_examples(4, 12, seed=5, prompt_len=3))
    ft.train(prep.peft_model, data, cfg.training, pad_id=0)
    untouched = weight_masks(prep.peft_model)          # training leaves the frozen base (and its zeros) as is
    out = ft.finish(prep, data, cfg, pad_id=0)
    after = weight_masks(out.model)
    assert all(torch.equal(after[k], masks[k]) for k in masks)          # the zero pattern is unchanged
    assert all(torch.equal(untouched[k], masks[k]) for k in masks)
    assert out.mask.kept and out.mask.rezeroed > 0
    assert out.mask.sparsity_after == out.mask.sparsity_before == prep.zeros.sparsity
    assert out.val_loss == pytest.approx(ft.mean_loss(out.model, data.val, 4, 0))


def test_kept_weights_hold_the_plain_merge_values_and_dense_models_merge_as_before():
    from gqaprune.config import build
    cfg = build(ft.FinetuneConfig, {"lora_r": 2, "lora_dropout": 0.0, "progress": False})
    results = {}
    for keep in ("auto", "false"):
        torch.manual_seed(0)
        prep = ft.prepare(sparse_tiny("llama", 8, 2), ft.FinetuneConfig(mask=ft.MaskConfig(keep), lora=cfg.lora))
        with torch.no_grad():
            for name, p in prep.peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        results[keep] = ft.finish(prep, fixed_data(random_examples(2, 8)), cfg, 0)
    kept, plain = results["auto"], results["false"]
    assert not plain.mask.kept and plain.mask.rezeroed == 0 and plain.val_loss is None
    assert plain.mask.sparsity_after < 0.01 < kept.mask.sparsity_after          # dense again without the mask
    for (name, a), (_, b) in zip(kept.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b * (a != 0)), name                # masked entries zeroed, the rest as merged
    dense = ft.prepare(make_tiny_model("llama", 8, 2, layers=2), cfg)
    assert not dense.zeros.kept and dense.zeros.masks is None
    assert ft.finish(dense, fixed_data(random_examples(2, 8)), cfg, 0).mask.rezeroed == 0


@pytest.fixture
def offline_datasets(monkeypatch):
    """``datasets`` reads the offline flags at import: set them in the imported modules too."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg
    for mod, attr in ((dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(mod, attr, True)


def test_record_sources_read_the_data_dirs_local_copy_offline(tmp_path, offline_datasets):
    import local_copies as lc
    from gqaprune.datadir import DataDir
    lc.write_alpaca(tmp_path / "data")
    lc.write_squad(tmp_path / "data")
    dd = DataDir(tmp_path / "data", tmp_path / "hf_cache")
    alpaca = ft.load_records("alpaca", dd)
    assert alpaca.form == "instruction" and len(alpaca.records) == 10
    assert alpaca.records[1] == {"instruction": "w8 w8", "input": "", "output": "w1 w5"}
    assert alpaca.source.startswith("yahma/alpaca-cleaned [train] (local copy ") and "sha256" in alpaca.source
    squad = ft.load_records("squad", dd)
    assert squad.form == "qa" and (len(squad.records), squad.skipped) == (3, 3)   # 3 unanswerable
    assert set(squad.records[0]) == {"context", "question", "answer"}
    # a data dir without the copy, offline: the data dir's own message names the expected path
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no local copy of yahma/alpaca-cleaned at .*empty.*fetch_data"):
        ft.load_records("alpaca", DataDir(tmp_path / "empty"))
