"""The server's few HTML pages (every value from outside escaped). noVNC itself comes from
Debian's novnc package at run time (/usr/share/novnc, served under /novnc/); our own script
is static/console.js."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from nomad_vm.console.registry import ConsoleEntry

_STYLE = """
body { font-family: sans-serif; margin: 0; }
header { padding: 0.5em 1em; background: #1d2b3a; color: #fff; }
.banner { padding: 0.7em 1em; background: #b00020; color: #fff; font-weight: bold; }
main { padding: 1em; }
table { border-collapse: collapse; } td, th { padding: 0.3em 0.8em; text-align: left; }
#screen { width: 100%; height: calc(100vh - 6em); background: #000; }
"""

NO_ACL_BANNER = (
    "Nomad ACLs are disabled: anyone who can reach this page can use every VM console listed "
    "here. Enable ACLs (the console then asks for a token with alloc-exec)."
)


def _page(title: str, content: str, banner: str | None, *, head: str = "", body: str = "") -> str:
    alert = f'<div class="banner" id="banner">{escape(banner)}</div>' if banner else ""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style>{head}</head><body{body}>"
        f"<header>nomad-vm consoles</header>{alert}<main>{content}</main></body></html>"
    )


def console_path(entry: ConsoleEntry) -> str:
    return f"/vm/{quote(entry.alloc_id, safe='')}/{quote(entry.task, safe='')}"


def listing(entries: list[ConsoleEntry], banner: str | None, who: str | None) -> str:
    rows = "".join(
        f"<tr><td>{escape(e.namespace)}</td><td>{escape(e.job)}</td>"
        f'<td><a href="{escape(console_path(e))}">{escape(e.task)}</a></td>'
        f"<td>{escape(e.alloc_id[:8])}</td><td>{escape(e.display)}</td></tr>"
        for e in entries
    )
    table = (
        '<table id="consoles"><tr><th>Namespace</th><th>Job</th><th>Task</th>'
        f"<th>Allocation</th><th>Display</th></tr>{rows}</table>"
        if entries
        else '<p id="consoles">No VM console on this node that you may open.</p>'
    )
    logout = (
        f'<form method="post" action="/logout"><p>Signed in as {escape(who)} '
        '<button type="submit">Sign out</button></p></form>'
        if who is not None
        else ""
    )
    return _page("VM consoles", logout + table, banner)


def login(banner: str | None, error: str | None = None) -> str:
    problem = f'<p id="error">{escape(error)}</p>' if error else ""
    form = (
        f'{problem}<form method="post" action="/login">'
        "<p>Your Nomad ACL token (it needs <code>alloc-exec</code> in the allocation's "
        "namespace, as <code>nomad alloc exec</code> does):</p>"
        '<p><input type="password" name="token" id="token" autocomplete="off" size="40"> '
        '<button type="submit" id="sign-in">Sign in</button></p></form>'
    )
    return _page("Sign in", form, banner)


def console(entry: ConsoleEntry, banner: str | None) -> str:
    ws = console_path(entry) + "/vnc"
    content = (
        f"<p>{escape(entry.namespace)} / {escape(entry.job)} / {escape(entry.task)} "
        f'({escape(entry.alloc_id[:8])}): <span id="status">loading</span> '
        '<button id="ctrl-alt-del">Ctrl-Alt-Del</button> <a href="/">all consoles</a></p>'
        '<div id="screen"></div>'
    )
    head = '<script type="module" src="/static/console.js"></script>'
    return _page(entry.task, content, banner, head=head, body=f' data-ws="{escape(ws)}"')
