"""OpenIPMI's ``ipmi_sim``, the peer the IPMI benches measure against: its configuration for one
BMC with one administrator (MD5), and the command line that runs it."""

from __future__ import annotations

from pathlib import Path

EMULATION = "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n"


def ipmi_sim_argv(work: Path, lan_port: int, user: str, password: str, extra: str = "") -> list[str]:
    """Write ``work``/lan.conf (IPMI over LAN on 127.0.0.1:``lan_port``, ``extra`` lines such as
    ``sol`` or ``serial`` after it) and ``work``/bench.emu; the ``ipmi_sim`` command line."""
    (work / "lan.conf").write_text(f"""name "bench"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {lan_port}
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
  endlan
{extra}  user 2 true "{user}" "{password}" admin 64 md5
""")
    (work / "bench.emu").write_text(EMULATION)
    return ["ipmi_sim", "-c", str(work / "lan.conf"), "-f", str(work / "bench.emu"), "-n", "-p"]
