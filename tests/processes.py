"""The live processes of a test (or a bench), found by their command lines."""

from __future__ import annotations

from pathlib import Path


def processes_with(*needles: str) -> list[int]:
    """The pids of the live (not zombie) processes whose command line has every one of
    ``needles`` (tests running beside this one have services of their own: name enough)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if all(needle in cmdline for needle in needles) and state != "Z":
                found.append(int(entry.name))
    return found
