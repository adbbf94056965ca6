"""report.py's cell formatting."""

from sstmerge.report import _tax


def test_tax_cell_prints_no_negative_zero():
    """A zero utility loss over a positive safety gain is a tax of 0, not "-0.00 [0.00, -0.00]"."""
    assert _tax({"defined": True, "value": -0.0, "ci95": [0.0, -0.0]}) == "0.00 [0.00, 0.00]"
    assert _tax({"defined": True, "value": -0.05, "ci95": [-0.13, None]}) == "-0.05 [-0.13, unbounded]"
    assert _tax({"defined": True, "value": -0.004, "ci95": [-0.0049, 0.001]}) == "0.00 [0.00, 0.00]"
    assert _tax({"defined": False, "value": None, "ci95": [None, None]}) == "undefined"


def test_change_cell_prints_no_negative_zero():
    from sstmerge.report import _change

    assert _change({"value": -0.0, "ci95": [-0.0, 0.0], "p_value": 1.0}) == "+0.0 [+0.0, +0.0] (p=1)"
    assert _change({"value": 0.052, "ci95": [-0.001, 0.104], "p_value": 0.12}) == "+5.2 [-0.1, +10.4] (p=0.12)"
    assert _change({"value": -0.0004, "ci95": [-0.0004, 0.0], "p_value": 1.0}) == "+0.0 [+0.0, +0.0] (p=1)"
