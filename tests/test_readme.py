"""The README's code example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_train_step_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "train_step(state)" in b)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["images"].shape == (4, *namespace["teacher"].image_shape)
    assert namespace["state"].step == 3
