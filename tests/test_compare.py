import json

from typer.testing import CliRunner

from tokenrl_cli.main import app


def test_compare_writes_table_json_plot_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
            "--algos", "grpo,t-spmo", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "8", "--eval-limit", "6",
            "--eval-every", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["base", "grpo", "t-spmo"]
    assert all(r["n"] == 6 for r in data["rows"])
    assert data["rows"][1]["steps"] == 2 and data["rows"][0]["delta_vs_base"] is None
    table = (out / "compare.md").read_text()
    assert "| grpo |" in table and "| t-spmo |" in table
    assert (out / "compare.png").stat().st_size > 10_000
    stamps = {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in ("base", "grpo", "t-spmo")}
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert stamps == {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in stamps}


def test_compare_rejects_unknown_algorithms(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo,ppo",
                                      "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--algos" in result.output
