"""One name, one meaning for each flag across commands, and the decoding flags on `compare` (issue 15).

In-process through the CLI entry point; the compare run uses the fake engine of test_eval on a tiny saved
model, so nothing is generated for real.
"""

from __future__ import annotations

import json

import pytest
import typer.main

from decodetune.cli.main import app, main


def _options() -> list[tuple[str, object]]:
    """(command, click option) for every option of every command."""
    group = typer.main.get_command(app)
    return [(name, p) for name, cmd in group.commands.items() for p in cmd.params if p.param_type_name == "option"]


def _longs(param) -> set[str]:
    return {o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")}


def test_every_short_flag_has_one_meaning_in_every_command():
    """-o was --output in generate but --objective in tune; -n --limit in eval but --trials in tune."""
    uses: dict[str, list[tuple[str, set[str]]]] = {}
    for command, param in _options():
        for short in (o for o in param.opts if not o.startswith("--")):
            uses.setdefault(short, []).append((command, _longs(param)))
    for short, where in uses.items():
        common = set.intersection(*(longs for _, longs in where))
        assert common, (short, where)  # one long name shared by every command that has the short flag
    assert all("--output" in longs and "--out" in longs for _, longs in uses["-o"])
    assert all("--limit" in longs for _, longs in uses["-n"])
    assert len(uses["-o"]) >= 9 and len(uses["-n"]) >= 6


def test_no_command_spells_a_flag_twice(tmp_path, monkeypatch):
    """augment had its own --seed and the decoding --seed: the user's seed reached neither for sure."""
    from collections import Counter

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        spelled = Counter(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        assert not [o for o, k in spelled.items() if k > 1], name
    import decodetune.train.augment.pipeline as pipeline

    seen = {}

    def fake_augment(rows, ops, n, seed, **kw):
        seen["seed"] = seed
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "augment", fake_augment)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hello there world"}\n')
    main(["augment", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--ops", "swap",
          "--seed", "5"])
    assert seen == {"seed": 5}


@pytest.mark.parametrize("argv, use", [
    (["tune", "--task", "arith", "-n", "5"], "--trials"),
    (["tune", "--task", "arith", "-o", "exact_match"], "--objective"),
    (["worker", "--storage", "s.journal", "--study-name", "s", "--task", "arith", "-n", "5"], "--trials"),
    (["worker", "--storage", "s.journal", "--study-name", "s", "--task", "arith", "-o", "chrf"], "--objective"),
    (["demo", "-n", "3"], "--trials"),
])
def test_a_short_flag_that_used_to_mean_something_else_says_what_to_type(argv, use, tmp_path, monkeypatch,
                                                                        capsys):
    """`tune -n 20` meant 20 trials: refused with the spelling to use, never quietly read as 20 items."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {argv[-2]}: no such option in {argv[0]}")
    assert f"use {use}" in err and "-n means --limit" in err
    assert not any(tmp_path.iterdir())


def test_long_spellings_still_work():
    group = typer.main.get_command(app)

    def longs(command: str, name: str) -> set[str]:
        return next(_longs(p) for p in group.commands[command].params if p.name == name)

    assert longs("tune", "trials") == {"--trials", "--n-trials"}
    assert longs("worker", "n_trials") == {"--trials", "--n-trials"}
    assert longs("tune", "objective") == longs("worker", "objective") == {"--objective"}
    assert longs("demo", "trials") == {"--trials"}
    assert {"--examples", "--limit"} <= longs("tasks", "examples")


def test_tasks_n_is_the_first_n_items(capsys):
    assert main(["tasks", "describe", "--json", "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["examples"]) == 2


def test_help_documents_output_for_files_and_out_for_folders():
    """Both spellings everywhere; the help lists --output FILE for a file and --out FOLDER for a folder."""
    writers = 0
    for command, param in _options():
        if not {"--out", "--output"} & set(param.opts):
            continue
        writers += 1
        assert {"--out", "--output"} <= set(param.opts), (command, param.opts)
        assert param.metavar in ("FILE", "FOLDER"), (command, param.name, param.metavar)
        assert param.opts[0] == ("--output" if param.metavar == "FILE" else "--out"), (command, param.opts)
    assert writers >= 11


# ---------------------------------------------------------------- compare takes the decoding flags




def test_compare_applies_the_decoding_flags_on_top_of_every_config(model_dir, engine, tmp_path, capsys):
    (tmp_path / "greedy.json").write_text('{"strategy": "greedy", "max_new_tokens": 40}')
    code = main(["compare", "-m", str(model_dir), "-t", "arith", "-n", "4", "--json", "--bootstrap", "0",
                 "-c", str(tmp_path / "greedy.json"), "-c", '{"strategy": "sample", "top_k": 50}',
                 "--max-new-tokens", "32", "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    configs = [r["config"] for r in json.loads(out)["results"]]
    assert [c["max_new_tokens"] for c in configs] == [32, 32]  # over the file, and over arith's default 12
    assert configs[1]["top_k"] == 3 and configs[1]["strategy"] == "sample"
    assert {c.max_new_tokens for c in engine.calls[0]["configs"]} == {32}
    assert "warning: greedy: top_k is ignored by strategy greedy" in err


def test_compare_checks_each_config_with_the_flags(model_dir, engine, capsys):
    # a beam config whose width comes from the flag is fine; the flag's bad value is one error line
    code = main(["compare", "-m", str(model_dir), "-t", "arith", "-n", "2", "--json", "--bootstrap", "0",
                 "-c", '{"strategy": "beam"}', "-c", '{"strategy": "beam", "length_penalty": 0.5}',
                 "--num-beams", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [r["config"]["num_beams"] for r in json.loads(out)["results"]] == [3, 3]
    assert main(["compare", "-m", "./no-such-model", "-t", "arith", "-c", "{}", "-c", "{}", "--top-p", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "top_p" in err


def test_compare_override_merges_aliases_and_keeps_one_seed_flag(tmp_path):
    from decodetune.cli.compare_cmd import parse_config_arg

    (tmp_path / "b.yaml").write_text("strategy: beam\nbeam_size: 2\n")
    assert parse_config_arg(str(tmp_path / "b.yaml"), {"num_beams": 5}) == ("b", {"strategy": "beam",
                                                                                  "num_beams": 5})
    assert parse_config_arg(str(tmp_path / "b.yaml")) == ("b", {"strategy": "beam", "beam_size": 2})
    compare = typer.main.get_command(app).commands["compare"]
    opts = [o for p in compare.params for o in p.opts]
    assert opts.count("--seed") == 1 and opts.count("--config") == 1  # compare's own, repeatable
    assert {"--max-new-tokens", "--temperature", "--top-p", "--strategy", "--num-beams"} <= set(opts)
