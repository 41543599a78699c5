"""`fastserve profile` writes a profile that common/profile.py reads back, with sane times."""

import json

from common.profile import Profile
from workers.profile import main


def test_profile_writes_a_readable_profile(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["--model", "tiny", "--out", str(out), "--input-lens", "8,64", "--batch-sizes", "1,4",
               "--context-lens", "16,48", "--repeats", "1", "--set", "parallel.num_stages=2",
               "--set", "cache.block_size=8"])
    assert rc == 0
    prof = Profile.load(out)
    assert prof.prefill_len == (8, 64) and prof.decode_batch == (1, 4) and prof.decode_context == (16, 48)
    assert all(t > 0 for t in prof.prefill_s) and all(t > 0 for row in prof.decode_s for t in row)
    meta = json.loads(out.read_text())
    assert meta["model"] == "tiny" and meta["num_stages"] == 2 and meta["block_size"] == 8
    assert prof.prefill_time(32) > 0


def test_profile_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1
    rc = main(["--model", "tiny", "--out", str(tmp_path / "p.json"), "--batch-sizes", "x"])
    assert rc == 2 and "batch-sizes" in capsys.readouterr().err
