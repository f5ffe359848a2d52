"""Jobs the e2e tests submit: one VM task that Nomad neither restarts nor reschedules, so a
failure shows at once as a failed allocation with the driver's event."""

from __future__ import annotations


def one_shot_job(
    name: str,
    config_lines: str,
    *,
    driver: str = "vm",
    job_type: str = "batch",
    memory_mb: int = 128,
    kill_timeout: str | None = None,
) -> str:
    """HCL of job ``name`` with a task "vm" whose `config {}` holds ``config_lines`` (HCL
    lines, indented by the caller)."""
    kill = f'\n      kill_timeout = "{kill_timeout}"' if kill_timeout else ""
    return f"""
job "{name}" {{
  type = "{job_type}"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "vm" {{
      driver = "{driver}"
      config {{
{config_lines}
      }}
      resources {{
        memory = {memory_mb}
      }}{kill}
    }}
  }}
}}
"""
