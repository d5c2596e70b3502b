"""A preflight's findings: each check's name, status (ok | warn | fail) and a line of detail, and the
facts later parts need (class count, split sizes)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("hello_ray.preflight.checks")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class CheckReport:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # classes, class_names, split sizes, ...

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    def add(self, name: str, status: str, detail: str) -> Check:
        check = Check(name, status, detail)
        self.checks.append(check)
        (log.error if check.failed else log.warning if status == "warn" else log.info)(
            "preflight check %s: %s: %s", name, status, detail)
        return check

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def to_json(self) -> dict[str, Any]:
        facts = {k: v for k, v in self.facts.items() if k != "class_names"}
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "facts": facts}
