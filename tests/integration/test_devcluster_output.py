"""The dev cluster forwards its children's output lines: a line longer than any reader's buffer is cut, not fatal,
and the child never blocks on a pipe nobody drains (a gateway that did stopped answering everyone)."""
import asyncio
import sys

from cxygpt_dev.processes import LINE_LIMIT, forward_lines

WRITER = ("import sys\n"
          "sys.stdout.write('x' * 5_000_000 + '\\n')\n"   # a 5 MB line, as a 404 once echoed a model name
          "for i in range(3): sys.stdout.write(f'line {i}\\n')\n"
          "sys.stdout.write('no newline at the end')\n")


async def test_a_huge_line_is_cut_and_the_writer_is_never_blocked():
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, stdout=asyncio.subprocess.PIPE)
    lines: list[str] = []
    await asyncio.wait_for(forward_lines(process, lines.append), 20)
    assert await asyncio.wait_for(process.wait(), 5) == 0
    assert len(lines) == 5
    assert lines[0].endswith("[line cut: 5000000 bytes]") and len(lines[0]) < LINE_LIMIT + 100
    assert lines[1:] == ["line 0", "line 1", "line 2", "no newline at the end"]
