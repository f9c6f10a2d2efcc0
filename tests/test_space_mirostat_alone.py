"""A space that can draw mirostat beside penalties / DRY is refused up front on llama.cpp-like backends."""

from __future__ import annotations

import pytest

from decodetune.backends.capabilities import LLAMACPP
from decodetune.errors import UserError
from decodetune.export import to_llamacpp
from decodetune.tuning.space import load_space
from decodetune.tuning.space_caps import check_space_capabilities

CLASH = """\
strategy: {choices: [greedy, sample]}
temperature: {low: 0.5, high: 1.2}
mirostat: {choices: [0, 2]}
repetition_penalty: {low: 1.0, high: 1.3}
"""


def load(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(str(path))


def test_mirostat_with_a_penalty_is_refused_naming_both_lines(tmp_path):
    space = load(tmp_path, CLASH)
    with pytest.raises(UserError) as e:
        check_space_capabilities(space, LLAMACPP, "llamacpp")
    msg = str(e.value)
    assert "\n" not in msg and "space.yaml:3: mirostat:" in msg
    assert "mirostat=2 with repetition_penalty=1.3 (" in msg and "space.yaml:4" in msg
    # what it saves the user from: the trial itself is refused by the export / backend rule
    cfg = space.config({"strategy": "sample", "temperature": 0.8, "mirostat": 2, "repetition_penalty": 1.3})
    with pytest.raises(UserError, match="repetition_penalty"):
        to_llamacpp(cfg)


def test_dry_beside_a_fixed_mirostat_is_refused(tmp_path):
    space = load(tmp_path, "strategy: sample\nmirostat: 1\ndry_multiplier: {choices: [0.0, 0.8]}\n")
    with pytest.raises(UserError, match="mirostat=1 with dry_multiplier=0.8"):
        check_space_capabilities(space, LLAMACPP, "llamacpp")


@pytest.mark.parametrize("text", [
    # the penalty only where mirostat cannot be: greedy (mirostat is a sampler) or a mirostat-off point
    "strategy: {choices: [greedy, sample]}\nmirostat: {value: 2, when: {strategy: sample}}\n"
    "repetition_penalty: {low: 1.0, high: 1.3, when: {strategy: greedy}}\n",
    "strategy: sample\nmirostat: 0\nrepetition_penalty: {low: 1.0, high: 1.3}\n",
    # penalties at their neutral value only
    "strategy: sample\nmirostat: {choices: [0, 2]}\nrepetition_penalty: 1.0\npresence_penalty: 0.0\n",
])
def test_spaces_that_never_draw_both_pass(tmp_path, text):
    check_space_capabilities(load(tmp_path, text), LLAMACPP, "llamacpp")


def test_backends_that_run_penalties_with_mirostat_are_not_concerned(tmp_path):
    import dataclasses

    check_space_capabilities(load(tmp_path, CLASH), dataclasses.replace(LLAMACPP, mirostat_alone=False), "x")
