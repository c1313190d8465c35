"""Job specs: schema, loading from YAML, one-line validation errors."""

from onebase.spec.load import load_spec, parse_spec, spec_kind
from onebase.spec.schema import JobSpec

__all__ = ["JobSpec", "load_spec", "parse_spec", "spec_kind"]
