"""Which experts a request may use: by organisation, or by the license class in provenance.

A request (or the server's own default) restricts the experts of an assembled model; the
result is the set of slots to drop, which :func:`flexfed.common.moe.optout.masked_experts`
removes exactly as ``flexfed optout --drop`` would. The public slot is never dropped: it is
what every member agreed to share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexfed.common.errors import InvalidInputError


class PolicyError(InvalidInputError):
    """A request's expert restriction is malformed or names an organisation the model lacks."""


@dataclass(frozen=True)
class Slot:
    """One expert slot of an assembled model, as assembly.json lists it."""

    index: int
    org: str | None
    name: str
    license: str | None

    @property
    def label(self) -> str:
        return "public" if self.org is None else f"{self.org}/{self.name}"

    def describe(self) -> dict[str, Any]:
        return {"slot": self.index, "org": self.org, "name": self.name, "license": self.license}


def slots_from_assembly(assembly: Mapping[str, Any]) -> list[Slot]:
    return [
        Slot(
            index=i,
            org=s.get("org"),
            name=str(s.get("name", "public")),
            license=s.get("license"),
        )
        for i, s in enumerate(assembly["slots"])
    ]


@dataclass(frozen=True)
class ExpertPolicy:
    """Restrictions on the experts a request may use; empty means every expert.

    ``include_orgs``: only these organisations' experts (the public slot always stays);
    ``exclude_orgs``: never these organisations' experts; ``licenses``: only experts whose
    provenance names one of these license classes.
    """

    include_orgs: tuple[str, ...] | None = None
    exclude_orgs: tuple[str, ...] = ()
    licenses: tuple[str, ...] | None = None

    @classmethod
    def from_request(cls, value: Any) -> ExpertPolicy:
        """Parse the ``flexfed`` object of a request body (None: no restriction)."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise PolicyError('"flexfed" must be an object, e.g. {"exclude_orgs": ["acme"]}')
        unknown = sorted(set(value) - {"include_orgs", "exclude_orgs", "licenses"})
        if unknown:
            raise PolicyError(
                f'unknown field(s) in "flexfed": {", ".join(unknown)}; '
                "expected include_orgs, exclude_orgs, licenses"
            )

        def names(key: str) -> tuple[str, ...] | None:
            got = value.get(key)
            if got is None:
                return None
            if not isinstance(got, list) or not all(isinstance(x, str) and x for x in got):
                raise PolicyError(f'"flexfed.{key}" must be a list of non-empty strings')
            return tuple(got)

        return cls(
            include_orgs=names("include_orgs"),
            exclude_orgs=names("exclude_orgs") or (),
            licenses=names("licenses"),
        )

    def merged(self, other: ExpertPolicy) -> ExpertPolicy:
        """Both policies at once (a request cannot loosen the server's own restrictions)."""

        def both(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> tuple[str, ...] | None:
            if a is None or b is None:
                return a if b is None else b
            return tuple(x for x in a if x in b)

        return ExpertPolicy(
            include_orgs=both(self.include_orgs, other.include_orgs),
            exclude_orgs=tuple(dict.fromkeys([*self.exclude_orgs, *other.exclude_orgs])),
            licenses=both(self.licenses, other.licenses),
        )

    def drop_slots(self, slots: Sequence[Slot]) -> tuple[int, ...]:
        """The slots this policy removes; naming an organisation the model lacks is an error."""
        present = {s.org for s in slots if s.org is not None}
        named = {*(self.include_orgs or ()), *self.exclude_orgs}
        unknown = sorted(named - present)
        if unknown:
            raise PolicyError(
                f"no expert of {', '.join(unknown)} in this model; "
                f"its experts belong to: {', '.join(sorted(present)) or 'nobody'}"
            )
        drop = []
        for s in slots:
            if s.org is None:
                continue
            if (
                s.org in self.exclude_orgs
                or (self.include_orgs is not None and s.org not in self.include_orgs)
                or (self.licenses is not None and s.license not in self.licenses)
            ):
                drop.append(s.index)
        return tuple(drop)
