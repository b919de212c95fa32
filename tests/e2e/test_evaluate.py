"""evaluate end to end, in process, on a tiny asr checkpoint with a random head (a weights-only save as
tests/e2e/test_finetune.py's: no training) and two raw-audio test sets whose rows carry a "language": per-set and
per-language WER / CER equal jiwer's on the hypotheses written, greedy and beam runs, and --compare over the two."""

from __future__ import annotations

import json

import pytest

from megatron_speech import evaluate
from tests.e2e.test_finetune import _tiny_finetune_model
from tests.fixtures import synthetic_test_files, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_sets(tmp_path_factory):
    """Two manifests over the 12 synthetic files; utterances alternate between "de" and "fr"."""
    root = tmp_path_factory.mktemp("eval")
    rows = [json.loads(line) for line in synthetic_test_files(root).read_text().splitlines()]
    for k, row in enumerate(rows):
        row["language"] = "de" if k % 2 else "fr"
    paths = []
    for name, part in (("clean.jsonl", rows[:7]), ("other.jsonl", rows[7:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(str(root / name))
    return paths


def _save_asr_checkpoint(path):
    """As test_finetune.py's _save_finetuned, keeping utterances from 0.5 s (the synthetic ones last 0.6-1.5 s)."""
    from megatron_speech.checkpoint.checkpointing import save_checkpoint
    from megatron_speech.config import config_to_dict

    cfg = tiny_config("data.min_sample_seconds=0.5", dropout=0.0)
    cfg.finetune.task, cfg.finetune.labels = "asr", list("abcdef|")
    _, model = _tiny_finetune_model("ctc", 8, False)
    save_checkpoint(path, 1, model, None, None, None, {"config": config_to_dict(cfg)})
    return path


def test_per_language_and_per_set_metrics_then_compare(test_sets, tmp_path, monkeypatch, capsys):
    jiwer = pytest.importorskip("jiwer")
    from megatron_speech.training import monitor

    monkeypatch.setattr(monitor, "setup_logging", lambda rank: None)  # pytest owns this process's logging
    checkpoint = _save_asr_checkpoint(tmp_path / "ckpt")
    manifests = [arg for path in test_sets for arg in ("--manifest", path)]
    greedy, beam = tmp_path / "greedy", tmp_path / "beam"
    assert evaluate.main(["--checkpoint", str(checkpoint), *manifests, "--output-dir", str(greedy)]) == 0
    assert evaluate.main(["--checkpoint", str(checkpoint), *manifests, "--output-dir", str(beam),
                          "--decoder", "beam", "--beam-width", "8"]) == 0
    capsys.readouterr()

    for run in (greedy, beam):
        result = json.loads((run / "metrics.json").read_text())
        rows = [json.loads(line) for line in (run / "hypotheses.jsonl").read_text().splitlines()]
        assert result["num_utterances"] == len(rows) == 12 and result["num_rejected_files"] == 0
        assert set(result["per_set"]) == {"clean.jsonl", "other.jsonl"} and set(result["per_language"]) == {"de", "fr"}
        groups = {"all": (result, rows)}
        groups |= {s: (m, [r for r in rows if r["set"] == s]) for s, m in result["per_set"].items()}
        groups |= {g: (m, [r for r in rows if r["language"] == g]) for g, m in result["per_language"].items()}
        for name, (got, members) in groups.items():
            refs = [r["reference"] for r in members]  # the synthetic text is already normalized
            hyps = [r["hypothesis"] for r in members]
            assert got["num_utterances"] == len(members), name
            assert got["wer"] == pytest.approx(jiwer.wer(refs, hyps)), name
            assert got["cer"] == pytest.approx(jiwer.cer(refs, hyps)), name
    assert json.loads((beam / "metrics.json").read_text())["decoder"] == "beam (width 8)"

    assert evaluate.main(["--compare", str(greedy), str(beam / "hypotheses.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["groups"]) == {"overall", "set=clean.jsonl", "set=other.jsonl", "language=de", "language=fr"}
    greedy_wer = json.loads((greedy / "metrics.json").read_text())["per_language"]["de"]["wer"]
    assert result["groups"]["language=de"]["wer"]["a"] == pytest.approx(greedy_wer)
