"""xnbd-wrapper-ctl's framing and exit-status rule (docs/compat.md §1.4)."""

from __future__ import annotations

from xnbdd.cli.wrapper_ctl import encode_line, split_return_code
from xnbdd.wrapper.control import decode_args


def test_exit_status_rule() -> None:
    assert split_return_code("a\nb\nreturn code 0\n") == ("a\nb\n", 0)
    assert split_return_code("return code 3\n") == ("", 3)
    assert split_return_code("return code 256\n") == ("", 1)
    assert split_return_code("return code -1\n") == ("", 1)
    assert split_return_code("no code at all\n") == ("no code at all\n", 1)


def test_arguments_survive_the_text_framing() -> None:
    words = ["add-target", "a name with spaces\nand a line", "/srv/x%y.img"]
    line = encode_line(words)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    head, *args = line.decode().rstrip("\n").split(" ")
    assert [head, *decode_args(args)] == words
    assert decode_args(["%zz", "%4"]) == ["%zz", "%4"], "malformed escapes stay literal"
