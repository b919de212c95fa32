import json
import subprocess
import sys

from tests.fixtures import ROOT


def test_plots_every_logged_metric(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s, "accuracy": 0.1 * s, "code_perplexity": 10.0,
             "lr": 1e-3, "grad_norm": 1.0, "audio_seconds_per_second": 50.0} for s in range(1, 6)]
    rows.append({"step": 5, "split": "valid", "loss": 2.6, "accuracy": 0.4, "code_perplexity": 9.0})
    rows.append({"step": 5, "split": "alarm", "message": "text is skipped"})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out", str(tmp_path / "plots")],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == sorted(["loss.png", "accuracy.png", "code_perplexity.png", "lr.png", "grad_norm.png",
                           "audio_seconds_per_second.png"])
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "loss.png" in out


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text("not json\n")
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(bad), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "m.jsonl:1" in r.stderr
