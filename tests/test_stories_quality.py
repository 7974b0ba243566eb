"""On the real pretrained stories260K at 20%: taylor beats magnitude and random (held-out PPL).

Protocol: calibration = 128 windows of 128 tokens from the calibration paragraphs of
tinystories_dev.txt; evaluation = the held-out paragraphs (every 10th), 256-token
non-overlapping BOS-prefixed windows. Dense PPL is about 5.2.
"""
import pytest
from transformers import AutoTokenizer

from gqaprune import checkpoint, data
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.methods import select
from gqaprune.structured.surgery import apply_plan
from tests.conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = [needs_shared, pytest.mark.shared]


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(STORIES)
    stream = data.eval_stream(tok, str(TINYSTORIES))
    calib = data.calibration_batches(tok, str(TINYSTORIES), 128, 128, seed=0)
    return tok, stream, calib


def ppl_after(method, setup, ratio=0.2):
    tok, stream, calib = setup
    model = checkpoint.load_model(STORIES).eval()
    plan = select(model, calib, method, StructuredConfig(pruning_ratio=ratio)).plan
    apply_plan(model, plan)
    return perplexity(model, stream, PplProtocol("tinystories", seq_len=256, bos=True),
                      tok.bos_token_id, show_progress=False).ppl


def test_dense_perplexity_matches_reference(setup):
    tok, stream, _ = setup
    model = checkpoint.load_model(STORIES).eval()
    ppl = perplexity(model, stream, PplProtocol("tinystories", seq_len=256, bos=True),
                     tok.bos_token_id, show_progress=False).ppl
    assert 4.5 < ppl < 6.0


def test_taylor_beats_magnitude_and_random_at_20_percent(setup):
    taylor = ppl_after("taylor", setup)
    assert taylor < ppl_after("magnitude", setup)
    assert taylor < ppl_after("random", setup)
    # LLM-Pruner's own code gives about 16 at 20% on this model (interpolated).
    assert taylor < 20


def test_reconstruction_recovers_most_of_the_damage(setup):
    """Issue 6 target: taylor at 20% with least-squares reconstruction stays below PPL 10."""
    from gqaprune.structured.reconstruct import ReconstructionConfig, prune_and_reconstruct
    tok, stream, calib = setup
    model = checkpoint.load_model(STORIES).eval()
    plan = select(model, calib, "taylor", StructuredConfig(pruning_ratio=0.2)).plan
    prune_and_reconstruct(model, plan, calib, ReconstructionConfig(reconstruct="lstsq", show_progress=False))
    ppl = perplexity(model, stream, PplProtocol("tinystories", seq_len=256, bos=True),
                     tok.bos_token_id, show_progress=False).ppl
    assert ppl < 10
