"""Progress off a terminal: one line per stage, none for transient inner bars; plurals."""

from leukoscope.progress import plural, progress


def test_plural():
    assert plural(1, "leukocyte") == "1 leukocyte"
    assert plural(0, "image") == "0 images" and plural(2, "image") == "2 images"
    assert plural(1234, "cell") == "1,234 cells" and plural(2, "mouse", "mice") == "2 mice"
    assert plural(15, "batch") == "15 batches" and plural(1, "batch") == "1 batch" and plural(3, "epoch") == "3 epochs"


def test_one_line_per_stage_in_a_log(capsys):
    # pytest's captured stderr is not a terminal, as in a piped log
    for epoch in (bar := progress(range(3), desc="train", unit="epoch")):
        for _ in progress(range(50), desc="batches", leave=False):
            pass
        bar.set_postfix(loss=f"{1 / (epoch + 1):.3f}")
    for _ in progress(range(7), desc="decode", unit="image", leave=False, log=True):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == ["train: 1/3 loss=1.000", "train: 2/3 loss=0.500", "train: 3/3 loss=0.333"]
    assert lines[3].startswith("train: 3 epochs in ") and lines[4].startswith("decode: 7 images in ")
    assert len(lines) == 5 and not any("batches" in line or "\r" in line for line in lines)
