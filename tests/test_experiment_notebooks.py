"Every paper notebook takes a `device` parameter and shows a scale-up command line whose parameters are valid."
import re, shlex
from pathlib import Path

import nbformat
import pytest

from moebook.evidence import PAPER_NOTEBOOKS
from moebook.runner import check_parameters, read_parameters

NBS = Path(__file__).resolve().parent.parent / "nbs"


@pytest.mark.parametrize("nb", PAPER_NOTEBOOKS)
def test_device_parameter(nb):
    spec = read_parameters(NBS / nb)
    assert "device" in spec, f"{nb} has no device parameter"
    assert spec["device"].type is str and spec["device"].default == "auto", spec["device"]


def scale_up_commands(nb: Path) -> list[list[str]]:
    "The `moebook run ...` commands in the notebook's markdown lines that mention a scale-up."
    cmds = []
    for cell in nbformat.read(nb, as_version=4).cells:
        if cell.cell_type != "markdown" or "Scale-up" not in cell.source: continue
        cmds += [shlex.split(m) for m in re.findall(r"`(moebook run [^`]+)`", cell.source)]
    return cmds


@pytest.mark.parametrize("nb", PAPER_NOTEBOOKS)
def test_scale_up_line_is_valid(nb):
    cmds = scale_up_commands(NBS / nb)
    assert cmds, f"{nb}: no **Scale-up** markdown line with a `moebook run ...` command"
    for argv in cmds:
        assert argv[:2] == ["moebook", "run"] and argv[2] == f"nbs/{nb}", argv
        rest = argv[3:]
        assert len(rest) % 3 == 0 and all(rest[i] == "-p" for i in range(0, len(rest), 3)), f"{nb}: expected -p NAME VALUE pairs: {argv}"
        values = {rest[i + 1]: rest[i + 2] for i in range(0, len(rest), 3)}
        assert "device" in values, f"{nb}: the scale-up line should set device"
        check_parameters(read_parameters(NBS / nb), values)  # raises ParameterError naming a bad name or value
