"""README's two set-up commands stay true: CI runs the test one verbatim."""
from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci_line = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith("sh tools/install_isolator.sh")]
    assert len(ci_line) == 1
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    assert ci_line[0] in readme


def test_readme_demo_command_uses_the_public_interface():
    readme = (ROOT / "README.md").read_text()
    assert "torchrun --nproc_per_node 2 launch/train.py +model=qwen3" in readme


def test_every_extra_a_readme_command_names_exists():
    """Issue 27, item 4: the VLM section needed transformers, which the install it named did not bring."""
    import re

    setup = (ROOT / "setup.py").read_text()
    readme = (ROOT / "README.md").read_text()
    for extra in set(re.findall(r'pip install -e "\.\[(\w+)\]"', readme)):
        assert f'"{extra}": [' in setup, extra
    before_vl_commands = readme.split("# stand-ins for the HF folders")[0][-400:]
    assert 'pip install -e ".[vl]"' in before_vl_commands
    assert '"transformers>=' in setup.split('"vl": [')[1].split("]")[0]
