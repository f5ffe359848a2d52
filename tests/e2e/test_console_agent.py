"""The browser console end to end: a real Nomad agent with ACLs on, the tiny guest started
with a display through it, `nomad-vm console serve`, and Debian's Chromium (headless, driven
by Playwright over DevTools) signing in with a token, opening the console page and showing
what the guest wrote on its VGA console. Tokens without alloc-exec, and none at all, are
refused; a VM of another namespace is not listed.

The guest clears tty0 and writes a line in bright white on red (VGA palette red, 170,0,0):
the screenshot must show red pixels with white text pixels among them, which a blank,
garbled or unconnected canvas does not. QEMU's own framebuffer (QMP screendump) cannot be
asked here: the plugin holds the VM's one QMP connection.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nomad_vm.cli.devagent import DevAgent, free_port
from nomad_vm.console.registry import read_entries
from nomad_vm.guests.tiny import tiny_cmdline
from tests.conftest import REPO, keep_artifact, wait_until
from tests.e2e.conftest import running_agent, wait_alloc
from tests.e2e.jobs import one_shot_job

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
WRITTEN = "console-marker-written"
# Clear the screen, then five lines of bright white on red, on the VGA console (tty0).
GUEST = (
    "printf '\\033[2J\\033[H' >/dev/tty0; i=0; while [ $i -lt 5 ]; do "
    "printf '\\033[1;37;41m  NOMAD-VM CONSOLE TEST  \\033[0m\\n' >/dev/tty0; i=$((i+1)); done; "
    f"echo {WRITTEN}; exec sleep 100000"
)
CAN_EXEC = 'namespace "default" {\n  capabilities = ["alloc-exec"]\n}\n'
CANNOT_EXEC = 'namespace "*" {\n  policy = "read"\n}\n'
# Counted in the page's canvas: VGA red (170,0,0), blurred a little by scaling.
RED_PIXELS_JS = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 120 && d[i+1] < 70 && d[i+2] < 70) n++;
  return n;
}"""


def vm_job(name: str, guest, namespace: str) -> str:  # type: ignore[no-untyped-def]
    cmdline = "console=tty0 " + tiny_cmdline(guest.cmdline, GUEST)
    lines = (
        # The bzImage: booted as an ELF (PVH) the kernel learns nothing of the VGA text
        # screen and writes tty0 to its dummy console.
        f'        kernel    = "{guest.vmlinuz}"\n'
        f'        initramfs = "{guest.initramfs}"\n'
        f'        cmdline   = "{cmdline}"\n'
        '        display   = "vga"'
    )
    job = one_shot_job(name, lines, job_type="service")
    return job.replace(f'job "{name}" {{', f'job "{name}" {{\n  namespace = "{namespace}"', 1)


def run_vm(agent: DevAgent, tmp: Path, name: str, guest, namespace: str) -> str:  # type: ignore[no-untyped-def]
    job = tmp / f"{name}.nomad.hcl"
    job.write_text(vm_job(name, guest, namespace))
    agent.nomad("job", "run", "-detach", str(job))
    alloc = wait_alloc_in(agent, name, namespace)
    alloc_id = str(alloc["ID"])
    logs = lambda: agent.nomad(  # noqa: E731
        "alloc", "logs", "-namespace", namespace, alloc_id, "vm", check=False
    )
    assert wait_until(lambda: WRITTEN in logs(), 180), logs()
    return alloc_id


def wait_alloc_in(agent: DevAgent, job: str, namespace: str) -> dict[str, object]:
    if namespace == "default":
        return wait_alloc(agent, job, {"running"})
    assert wait_until(
        lambda: any(
            a["ClientStatus"] == "running"
            for a in agent.api(f"/v1/job/{job}/allocations?namespace={namespace}")  # type: ignore[union-attr]
        ),
        180,
    )
    (alloc,) = agent.api(f"/v1/job/{job}/allocations?namespace={namespace}")  # type: ignore[misc]
    return alloc  # type: ignore[no-any-return]


def client_token(agent: DevAgent, name: str, rules: str) -> str:
    agent.api(f"/v1/acl/policy/{name}", "POST", {"Name": name, "Rules": rules})
    token = agent.api("/v1/acl/token", "POST", {"Name": name, "Type": "client", "Policies": [name]})
    assert isinstance(token, dict)
    return str(token["SecretID"])


def serve_argv(agent: DevAgent, listen: str) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "nomad-vm"),
        "console",
        "serve",
        "--listen",
        listen,
        "--nomad-addr",
        agent.address,
        "--data-dir",
        str(agent.config.workdir / "plugin-data"),
    ]


@contextlib.contextmanager
def console_server(agent: DevAgent, log: Path) -> Iterator[str]:
    port = free_port()
    argv = [
        str(REPO / ".venv" / "bin" / "nomad-vm"),
        "console",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--nomad-addr",
        agent.address,
        "--data-dir",
        str(agent.config.workdir / "plugin-data"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        assert wait_until(
            lambda: "serving VM consoles" in log.read_text() or server.poll() is not None, 30
        ), log.read_text()
        assert server.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
        print(f"console server log: {log}")


def text_pixels(png: Path, box: dict[str, float]) -> tuple[int, int]:
    """(red, white on red) pixels of the screenshot inside ``box`` (the canvas)."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    x0, y0 = int(box["x"]), int(box["y"])
    crop = image.crop((x0, y0, x0 + int(box["width"]), y0 + int(box["height"])))
    raw = crop.tobytes()
    pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
    red = [i for i, (r, g, b) in enumerate(pixels) if r > 120 and g < 70 and b < 70]
    if not red:
        return 0, 0
    width = crop.width
    rows = {i // width for i in red}
    white = sum(
        1
        for i, (r, g, b) in enumerate(pixels)
        if i // width in rows and r > 200 and g > 200 and b > 200
    )
    return len(red), white


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make setup)")
def test_browser_console_with_acls(tiny_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with running_agent([tiny_guest.vmlinux.parent], acl=True) as agent:
        agent.api("/v1/namespace/other", "POST", {"Name": "other"})
        can = client_token(agent, "console-ok", CAN_EXEC)
        cannot = client_token(agent, "console-no", CANNOT_EXEC)
        mine = run_vm(agent, tmp_path, "console-vm", tiny_guest, "default")
        other = run_vm(agent, tmp_path, "other-vm", tiny_guest, "other")
        on_node = {e.alloc_id for e in read_entries(agent.config.workdir / "plugin-data")}
        assert on_node == {mine, other}
        path = f"/vm/{mine}/vm"
        with console_server(agent, tmp_path / "console.log") as base:
            api = f"{base}/api/consoles"
            assert httpx.get(api).status_code == 401
            assert httpx.get(base + path).status_code == 401
            listed = httpx.get(api, headers={"X-Nomad-Token": can}).json()["consoles"]
            assert [(c["alloc_id"], c["namespace"]) for c in listed] == [(mine, "default")]
            assert httpx.get(api, headers={"X-Nomad-Token": cannot}).json()["consoles"] == []
            assert httpx.get(base + path, headers={"X-Nomad-Token": cannot}).status_code == 403
            assert httpx.get(base + path, headers={"X-Nomad-Token": "bogus"}).status_code == 403
            # Someone who may exec everywhere sees both: "not listed" above is the token's.
            everyone = httpx.get(api, headers={"X-Nomad-Token": agent.token or ""}).json()
            assert {c["alloc_id"] for c in everyone["consoles"]} == {mine, other}

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
                try:
                    refused = browser.new_page()
                    response = refused.goto(base + path)
                    assert response is not None and response.status == 401
                    refused.goto(base + "/")
                    refused.fill("#token", cannot)
                    refused.click("#sign-in")
                    refused.wait_for_selector("#consoles")
                    assert "No VM console" in refused.inner_text("#consoles")
                    response = refused.goto(base + path)
                    assert response is not None and response.status == 403

                    page = browser.new_page(viewport={"width": 1024, "height": 768})
                    page.goto(base + "/")
                    page.fill("#token", can)
                    page.click("#sign-in")
                    page.wait_for_selector(f'a[href="{path}"]')
                    assert other not in page.content()
                    page.click(f'a[href="{path}"]')
                    page.wait_for_selector('#status[data-state="connected"]', timeout=60_000)
                    # The guest's red lines reach the canvas. (Read with evaluate: our page's
                    # CSP forbids wait_for_function's string eval, as it should.)
                    assert wait_until(lambda: page.evaluate(RED_PIXELS_JS) > 500, 60)
                    shot = tmp_path / "console.png"
                    page.screenshot(path=str(shot))
                    kept = keep_artifact(shot, "browser-console.png")
                    print(f"\nconsole screenshot: {kept}", file=sys.stderr)
                    box = page.locator("#screen canvas").bounding_box()
                    assert box is not None
                    status = page.inner_text("#status")
                finally:
                    browser.close()
        red, white = text_pixels(shot, box)
        print(f"screenshot: {red} red pixels, {white} white pixels in their rows")
        assert status == "connected"
        assert red > 500, red
        # Text, not a red block: bright white glyph pixels in the red lines.
        assert white > 100, white


def test_example_job_serves_the_console_under_raw_exec(tiny_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """examples/console.nomad.hcl as shipped, on an agent with ACLs and raw_exec: the server
    comes up as a Nomad job and asks for a token."""
    port = free_port()
    with running_agent([tiny_guest.vmlinux.parent], acl=True, raw_exec=True) as agent:
        agent.nomad(
            "job",
            "run",
            "-detach",
            "-var",
            f"nomad_vm={REPO / '.venv' / 'bin' / 'nomad-vm'}",
            "-var",
            f"listen=127.0.0.1:{port}",
            "-var",
            f"nomad_addr={agent.address}",
            "-var",
            f"data_dir={agent.config.workdir / 'plugin-data'}",
            str(REPO / "examples" / "console.nomad.hcl"),
        )
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(base + "/api/consoles").status_code == 401
            return False

        assert wait_until(answers, 120), agent.nomad("job", "status", "nomad-vm-console")
        page = httpx.get(base + "/")
        assert page.status_code == 200 and 'name="token"' in page.text
        listed = httpx.get(base + "/api/consoles", headers={"X-Nomad-Token": agent.token or ""})
        assert listed.json() == {"acls": True, "consoles": []}
        agent.nomad("job", "stop", "-detach", "nomad-vm-console")
        assert wait_until(lambda: not answers(), 60)


def test_acls_off_loopback_only_and_said_loudly(tiny_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with running_agent([tiny_guest.vmlinux.parent]) as agent:
        refused = subprocess.run(
            serve_argv(agent, f"0.0.0.0:{free_port()}"), capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 2
        assert "--listen" in refused.stderr and "ACLs are disabled" in refused.stderr
        log = tmp_path / "console.log"
        with console_server(agent, log) as base:
            page = httpx.get(base + "/")
            assert page.status_code == 200 and 'id="banner"' in page.text
            assert "ACLs are disabled" in page.text
            assert httpx.get(base + "/api/consoles").json() == {"acls": False, "consoles": []}
        assert "NOMAD ACLS ARE DISABLED" in log.read_text()
