"""Few-step quality on the embedded digits model, through ComfyUI's own nodes, scored on the decoded images.

The graphs are tests/support/digits_rows.py's (CheckpointLoaderSimple, CLIPTextEncode "a handwritten digit d",
KSampler, VAEDecode, SaveImage; LoraLoaderModelOnly for the PCM LoRA shipped in assets/digits/). The scores are
a digit classifier's accuracy against the prompts and the Fréchet distance of its features to held-out digits.
Bounds come from measured values with margin (docs/digits_model.md has the measurements and the mutations each
test was seen to catch).
"""
import pytest

from support import digits_model
from support.digits_rows import STUDENT_ROWS, TEACHER_ROWS, Scorer, load_images, row_graph
from support.server import execution_error, history_status

PER_DIGIT = 5
SEED = 2000  # not the demo's seed: the tests see other noise than the measurements in the README


@pytest.fixture(scope="module")
def scorer():
    return Scorer()


_images = {}


def sample_row(server, row, per_digit=PER_DIGIT):
    """The row's decoded images (cached for the module: the 25-step teacher serves two tests)."""
    if row in _images:
        return _images[row]
    graph = row_graph(row, digits_model.CHECKPOINT_NAME, digits_model.PCM_LORA_PATH.name, per_digit=per_digit,
                      seed=SEED, prefix=f"e2e_digits_{row.sampler}_{row.steps}_{int(row.lora)}")
    entry = server.run(graph, timeout=600)
    assert history_status(entry) == "success", execution_error(entry)
    files = server.output_files(entry)
    assert len(files) == 10 * per_digit, files
    _images[row] = load_images(files)
    return _images[row]



def row(rows, sampler, steps):
    return next(r for r in rows if r.sampler == sampler and r.steps == steps)


def test_teacher_draws_the_prompted_digit(server, scorer):
    scores = scorer.score(sample_row(server, row(TEACHER_ROWS, "ddim", 25)), PER_DIGIT)
    print("teacher, 25 steps:", scores)
    assert scores["accuracy"] >= 0.9, scores


def test_pcm_lora_at_two_steps_beats_the_teacher_at_two_steps(server, scorer):
    teacher = scorer.score(sample_row(server, row(TEACHER_ROWS, "ddim", 2)), PER_DIGIT)
    student = scorer.score(sample_row(server, row(STUDENT_ROWS, "pcm", 2)), PER_DIGIT)
    print("teacher, 2 steps:", teacher, "PCM LoRA, 2 steps:", student)
    assert student["accuracy"] >= 0.9, (student, teacher)
    assert student["fd"] < 0.6 * teacher["fd"], (student, teacher)

