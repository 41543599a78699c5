"""`fastserve generate`: JSON output, the reference helper, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from workers.generate import main
from workers.offline import OfflineEngine, generate_reference
from workers.model.sampling import SamplingParams


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_ids_equal_reference_and_two_stage_engine(capsys):
    rc, out, err = run(capsys, "--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "12")
    assert rc == 0 and err == ""
    tokens = json.loads(out)["token_ids"]
    assert len(tokens) == 12
    assert tokens == generate_reference("tiny", [1, 2, 3], 12)
    engine = OfflineEngine.build("tiny", num_stages=2, num_blocks=64, block_size=8)
    assert engine.generate([[1, 2, 3]], [SamplingParams(max_tokens=12)])[0] == tokens


def test_text_prompt_adds_text(capsys):
    rc, out, _ = run(capsys, "--model", "tiny", "--prompt", "hi", "--max-tokens", "4")
    result = json.loads(out)
    assert rc == 0 and len(result["token_ids"]) == 4 and isinstance(result["text"], str)
    assert result["token_ids"] == generate_reference("tiny", [104, 105], 4)


def test_batched_engine_equals_each_prompt_alone():
    prompts = [[1, 2, 3], list(range(40, 90)), [200], [7, 7, 7, 7, 7]]
    params = [SamplingParams(max_tokens=n) for n in (10, 3, 17, 8)]
    engine = OfflineEngine.build("tiny", num_stages=2, num_blocks=40, block_size=4, max_jobs=3)
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        assert out == generate_reference("tiny", prompt, p.max_tokens)


def test_stop_token_ends_early(capsys):
    full = generate_reference("tiny", [1, 2, 3], 12)
    stop = full[4]
    rc, out, _ = run(capsys, "--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "12",
                     "--stop-token-ids", str(stop))
    assert json.loads(out)["token_ids"] == full[:full.index(stop) + 1]


def _malformed(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    return str(tmp_path)


def _missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    return str(tmp_path)


@pytest.mark.parametrize("args,needle", [
    (["--prompt-ids", ""], "prompt is empty"),
    (["--prompt-ids", "1,259"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,2", "--max-tokens", "2047"], "over the context length"),
    (["--prompt-ids", "1", "--max-tokens", "0"], "max_tokens"),
    (["--prompt-ids", "1", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, needle):
    rc, out, err = run(capsys, "--model", "tiny", *args)
    assert rc == 2 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("make,needle", [
    (lambda p: str(p / "missing"), "does not exist"),
    (_malformed, "not valid JSON"),
    (_missing_field, "hidden_size"),
    (lambda p: str(p), "no config.json"),
])
def test_bad_model_directory_exits_2_with_one_line(capsys, tmp_path, make, needle):
    rc, out, err = run(capsys, "--model", make(tmp_path), "--prompt-ids", "1,2")
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_command_line_entry_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(tmp_path / "x"),
                           "--prompt-ids", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
