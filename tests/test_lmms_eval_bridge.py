"""The lmms-eval bridge (qe.integrations.lmms_eval) on tiny models and hand-made requests.

lmms-eval is an optional extra (``pip install qe-quant[lmms]``): every test that needs it skips
where it is not installed, which is the case in CI. No benchmark data is downloaded: requests
are lmms-eval ``Instance`` objects built here over a built-in image, exactly in the shapes the
evaluator builds for "simple" models, and one test runs the evaluator itself on a two-document
task written to a temporary folder.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qe.errors import ConfigError, DataError, QEError

TASK, SPLIT = "qe_fake", "test"
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def bridge():
    pytest.importorskip("lmms_eval")
    return importlib.import_module("qe.integrations.lmms_eval")


@pytest.fixture(scope="module")
def image():
    from qe.data.images import builtin_image_captions, sample_image

    return sample_image(builtin_image_captions("eval")[0])


@pytest.fixture(scope="module")
def tiny(bridge, image):
    """``--model qe`` on tiny:llava, with a one-document fake task in its task_dict."""
    lm = bridge.QELMMs(pretrained="tiny:llava", device="cpu", batch_size="1", progress=False)
    lm.task_dict = {TASK: {SPLIT: [{"image": image, "answer": "a cup"}]}}
    return lm


def doc_image(doc):
    return [doc["image"]]


def request(kind: str, *args):
    from lmms_eval.api.instance import Instance

    return Instance(kind, tuple(args), 0, {"task": TASK, "doc_id": 0, "repeats": 1})


def loglikelihood(lm, continuation, context=PROMPT):
    [(logprob, greedy)] = lm.loglikelihood([request("loglikelihood", context, continuation, doc_image, 0, TASK, SPLIT)])
    return logprob, greedy


def generate(lm, generation_kwargs, context=PROMPT):
    [text] = lm.generate_until([request("generate_until", context, generation_kwargs, doc_image, 0, TASK, SPLIT)])
    return text


def greedy_ids(lm, image, n: int) -> list[int]:
    """The model's own greedy continuation (transformers' generate), as token ids."""
    inputs = lm.encode_prompt(lm.format_prompt(PROMPT, 1), [image])
    out = lm.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=lm.eot_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def round_trip_prefix(tokenizer, ids: list[int]) -> int:
    """The longest prefix of ``ids`` that decodes to text which tokenizes back to exactly it
    (byte-level BPE can split a character over tokens; such a prefix is not a text continuation)."""
    best = 0
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:k]:
            best = k
    return best


# ---------------------------------------------------------------------- without lmms-eval
def test_missing_lmms_eval_is_one_line_qe_error(monkeypatch):
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.instance", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.delitem(sys.modules, "qe.integrations.lmms_eval", raising=False)
    with pytest.raises(QEError, match=r"pip install qe-quant\[lmms\]") as info:
        importlib.import_module("qe.integrations.lmms_eval")
    assert "\n" not in str(info.value)


def test_import_qe_does_not_import_lmms_eval():
    code = "import sys, qe, qe.integrations; assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------- pure helpers
@given(st.text(alphabet="ab\n.", max_size=12), st.lists(st.text(alphabet="ab\n.", min_size=1, max_size=3), max_size=3))
def test_cut_at_stop_is_the_text_before_the_first_stop(bridge, text, stops):
    cut = bridge.cut_at_stop(text, stops)
    assert text.startswith(cut)
    assert not any(stop in cut for stop in stops)
    if len(cut) < len(text):  # it stopped at a stop string, not earlier
        assert any(text[len(cut):].startswith(stop) for stop in stops)


# ---------------------------------------------------------------------- loglikelihood
def test_loglikelihood_is_finite_and_matches_the_models_own_loss(tiny, image):
    continuation = " a cup of coffee"
    logprob, _ = loglikelihood(tiny, continuation)
    assert math.isfinite(logprob) and logprob < 0
    # Reference: transformers' own shifted cross-entropy over the same tokens (mean, so times n).
    prompt = tiny.encode_prompt(tiny.format_prompt(PROMPT, 1), [image])
    target = tiny.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], target], 1)
    labels = ids.clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100
    inputs = {**prompt, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        loss = tiny.model(**inputs, labels=labels).loss
    assert logprob == pytest.approx(-float(loss) * target.shape[1], rel=1e-4)


def test_loglikelihood_of_the_greedy_continuation_is_greedy(tiny, image):
    ids = greedy_ids(tiny, image, 6)
    k = round_trip_prefix(tiny.tokenizer, ids)
    assert k >= 1, f"no greedy prefix of {ids} survives decode/encode"
    # The bridge's own generation (lmms-eval's generate_until) gives that continuation ...
    text = generate(tiny, {"max_new_tokens": k, "until": []})
    assert text == tiny.tokenizer.decode(ids[:k], skip_special_tokens=True)
    logprob, greedy = loglikelihood(tiny, text)
    assert greedy and math.isfinite(logprob)
    # ... and swapping its last token for another one that round-trips makes it not greedy, less likely.
    for other in range(4, tiny.tokenizer.vocab_size):
        swapped = ids[: k - 1] + [other]
        if other != ids[k - 1] and round_trip_prefix(tiny.tokenizer, swapped) == k:
            break
    swapped_logprob, swapped_greedy = loglikelihood(tiny, tiny.tokenizer.decode(swapped))
    assert not swapped_greedy and swapped_logprob < logprob


def test_loglikelihood_reads_doc_to_target_and_unconditional_requests(tiny):
    def answer(doc):
        return " " + doc["answer"]

    by_callable = tiny.loglikelihood([request("loglikelihood", PROMPT, answer, doc_image, 0, TASK, SPLIT)])
    by_string = loglikelihood(tiny, " a cup")
    assert by_callable[0] == pytest.approx(by_string)
    # acc_mutual_info's ("", choice) requests: no document, no image.
    [(logprob, _)] = tiny.loglikelihood([request("loglikelihood", "", " a cup")])
    assert math.isfinite(logprob)
    assert loglikelihood(tiny, "") == (0.0, True)


# ---------------------------------------------------------------------- generation
def test_generate_until_stops_before_the_stop_string(tiny, image):
    ids = greedy_ids(tiny, image, 8)
    full = generate(tiny, {"max_new_tokens": 8})
    assert full == tiny.tokenizer.decode(ids, skip_special_tokens=True)
    head = tiny.tokenizer.decode(ids[:2], skip_special_tokens=True)
    stop = full[len(head):len(head) + 2]  # a string the model reaches after two tokens
    assert stop, full
    text = generate(tiny, {"max_new_tokens": 64, "until": [stop]})
    assert text == full[: full.index(stop)]
    assert stop not in text and full.startswith(text)
    assert generate(tiny, {"max_new_tokens": 8, "until": stop}) == text  # one string, not a list


def test_generate_until_multi_round_follows_doc_to_text(tiny, image):
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["image"]], f"Round {round_idx}: say more.", False, previous_output, {"round": round_idx}

    kwargs = {"max_new_tokens": 3, "until": ["\n"]}
    [answers] = tiny.generate_until_multi_round(
        [request("generate_until_multi_round", PROMPT, kwargs, doc_image, doc_to_text, 0, TASK, SPLIT)]
    )
    assert len(answers) == 2 and answers[0] == generate(tiny, {"max_new_tokens": 3})
    assert [s[0] for s in seen] == [1, 2]
    assert seen[0][1] == answers[:1] and seen[1][1] == answers and seen[1][2] == {"round": 1}


@pytest.mark.parametrize("family", ["llava_siglip", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl"])
def test_every_tiny_family_reads_zero_one_and_two_images(bridge, image, family):
    lm = bridge.QELMMs(pretrained=f"tiny:{family}", device="cpu", progress=False)
    image_id = lm.adapter.image_token_id(lm.model)

    def vision_tokens(n):
        inputs = lm.encode_prompt(lm.format_prompt(PROMPT, n), [image] * n)
        return int((inputs["input_ids"] == image_id).sum())

    one = vision_tokens(1)
    assert vision_tokens(0) == 0 and one > 0 and vision_tokens(2) == 2 * one
    for n in (0, 1, 2):
        logprob, _ = lm.continuation_logprob(PROMPT, " a cup", [image] * n)
        assert math.isfinite(logprob) and logprob < 0
    assert isinstance(lm.generate(PROMPT, [image], {"max_new_tokens": 3, "until": ["."]}), str)


# ---------------------------------------------------------------------- prompts and arguments
def test_prompt_has_one_image_marker_per_image(tiny):
    marker = tiny.image_marker()
    assert tiny.format_prompt(PROMPT, 1) == tiny.adapter.format_prompt(tiny.processor, PROMPT)
    for n in (0, 1, 2, 3):
        assert tiny.format_prompt(PROMPT, n).count(marker) == n
        assert tiny.format_prompt(f"{marker}\n" * n + PROMPT, n).count(marker) == n  # markers already there
    with pytest.raises(DataError, match="image markers"):
        tiny.format_prompt(f"{marker} {marker} {PROMPT}", 3)


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_prompt_uses_the_processors_chat_template_for_any_image_count(tiny, monkeypatch):
    monkeypatch.setattr(tiny.processor, "chat_template", CHAT_TEMPLATE)
    for n in (0, 1, 2):
        assert tiny.format_prompt(PROMPT, n) == "[user]" + "<image>" * n + PROMPT + "[assistant]"
    assert math.isfinite(tiny.continuation_logprob(PROMPT, " a cup", [tiny.task_dict[TASK][SPLIT][0]["image"]] * 2)[0])


def test_video_or_audio_visuals_are_refused_in_one_line(tiny):
    with pytest.raises(DataError, match="images"):
        tiny.generate_until([request("generate_until", PROMPT, {}, lambda doc: ["clip.mp4"], 0, TASK, SPLIT)])
    with pytest.raises(DataError, match="task_dict"):
        tiny.generate_until([request("generate_until", PROMPT, {}, doc_image, 7, TASK, SPLIT)])


def test_model_args_are_checked(bridge, tiny):
    with pytest.raises(ConfigError, match="unknown model_args.*colour"):
        bridge.QELMMs(loaded=tiny.loaded, colour="red")
    with pytest.raises(ConfigError, match="prompt_format"):
        bridge.QELMMs(loaded=tiny.loaded, prompt_format="fancy")
    with pytest.raises(ConfigError, match="batch_size='many': give a whole number or auto"):
        bridge.QELMMs(loaded=tiny.loaded, batch_size="many")
    with pytest.raises(ConfigError, match="max_new_tokens=2.5"):
        bridge.QELMMs(loaded=tiny.loaded, max_new_tokens=2.5)
    with pytest.raises(ConfigError, match="max_rounds=0 must be at least 1"):
        bridge.QELMMs(loaded=tiny.loaded, max_rounds=0)
    assert bridge.QELMMs(loaded=tiny.loaded, batch_size="auto:4").batch_size == 1


def test_registered_as_model_qe_and_built_from_an_arg_string(bridge, tiny):
    import lmms_eval.models

    assert bridge.register() is bridge.QELMMs
    cls = lmms_eval.models.get_model("qe")
    assert cls is bridge.QELMMs
    # What lmms-eval's evaluator does with --model qe --model_args ... --batch_size 1.
    lm = cls.create_from_arg_string(
        "pretrained=tiny:llava,device=cpu,max_new_tokens=5,progress=False",
        {"batch_size": "1", "max_batch_size": None, "device": None},
    )
    assert lm.settings.max_new_tokens == 5 and lm.batch_size == 1 and lm.device == torch.device("cpu")


# ---------------------------------------------------------------------- quantized checkpoints
def test_quantized_checkpoint_scores_and_generates(bridge, tiny, image, tmp_path):
    from qe.commands.quantize import run_quantize
    from qe.quantizers.qlinear import QuantLinear
    from qe.recipe import Recipe

    out, _ = run_quantize(Recipe(samples=2), "tiny:llava", out=tmp_path / "q", progress=False)
    lm = bridge.QELMMs(pretrained=str(out), device="cpu", progress=False)
    assert lm.loaded.manifest is not None
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    lm.task_dict = tiny.task_dict
    logprob, _ = loglikelihood(lm, " a cup of coffee")
    reference, _ = loglikelihood(tiny, " a cup of coffee")
    assert math.isfinite(logprob) and logprob != reference  # the quantized weights are the ones scored
    assert isinstance(generate(lm, {"max_new_tokens": 4}), str)


# ---------------------------------------------------------------------- lmms-eval's evaluator
TASK_YAML = """\
task: qe_fake_caption
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """\
from qe.data.images import load_image


def doc_to_visual(doc):
    return [load_image(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def test_lmms_eval_evaluator_runs_a_local_task_with_model_qe(bridge, tiny, tmp_path, monkeypatch):
    """The real evaluator, offline: a two-document task from a JSON file, no built-in tasks indexed."""
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"image": "skimage:coffee", "question": q, "answer": a}) + "\n"
                            for q, a in [("What is this?", "coffee"), ("What colour is the saucer?", "red")]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qe_fake_caption.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "datasets-cache"))
    (tasks / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    manager = TaskManager("ERROR", include_path=str(tasks), include_defaults=False)
    lm = bridge.QELMMs(loaded=tiny.loaded, progress=False)
    results = simple_evaluate(model=lm, tasks=["qe_fake_caption"], task_manager=manager, log_samples=True,
                              batch_size=1, device="cpu")
    scores = results["results"]["qe_fake_caption"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    samples = results["samples"]["qe_fake_caption"]
    assert len(samples) == 2
    for sample in samples:  # the evaluator's answers are the bridge's own generations
        doc = sample["doc"]
        expected = generate(tiny, {"max_new_tokens": 4, "until": ["\n"]}, context=doc["question"])
        assert sample["resps"][0][0] == expected
