"""Engine log lines as the console shows them: without lines about users' requests, bounded, resumed without repeats."""
from __future__ import annotations

import re

MATCH_LINES = 20            # how many of the last lines shown locate a resumed read in the log
MAX_LINE_CHARS = 4000        # a longer line is cut (a progress bar redrawn a thousand times is one line)
# Lines that tell who asked what: vLLM's request log (--enable-log-requests: prompts, sampling parameters),
# uvicorn's access log (client address, path, status), and the gateway's JSON request line. Another user's
# request is theirs: the console never shows these lines, it counts them.
REQUEST_LINE = re.compile(
    r"(Received request|Added request|Finished request|Aborted request|Generated response|"
    r"\"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /[^\"]*\" \d{3}|"
    r"\"logger\": ?\"cxygpt\.gateway\.requests\")")


def about_a_request(line: str) -> bool:
    return REQUEST_LINE.search(line) is not None


def shown_lines(lines: list[str]) -> tuple[list[str], int]:
    """The lines to show (cut to MAX_LINE_CHARS) and how many were held back as request lines."""
    shown, hidden = [], 0
    for line in lines:
        if about_a_request(line):
            hidden += 1
        else:
            shown.append(line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " …[cut]")
    return shown, hidden


def after_overlap(seen_tail: list[str], fetched: list[str]) -> list[str]:
    """The lines of a fresh read of a log's tail that come after what was already shown. An API server that
    does not stream `follow` answers the log so far and closes; a resumed read then overlaps the last read.
    The longest suffix of `seen_tail` that is a prefix of some position of `fetched` marks where new lines
    start; with no overlap at all everything fetched is new (the log turned over, e.g. a restarted container).
    Runs of identical lines are ambiguous: the latest alignment is taken (a repeat may be missed, never doubled)."""
    seen_tail = seen_tail[-MATCH_LINES:]
    if not seen_tail:
        return fetched
    for size in range(min(len(seen_tail), len(fetched)), 0, -1):
        suffix = seen_tail[-size:]
        for start in range(len(fetched) - size, -1, -1):
            if fetched[start:start + size] == suffix:
                return fetched[start + size:]
    return fetched
