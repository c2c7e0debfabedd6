"""The CredScope Python client over the generated stubs, and the ``credscope`` command."""

from client.applicants import applicant_from_mapping
from client.client import CredScopeClient, CredScopeRpcError

__all__ = ["CredScopeClient", "CredScopeRpcError", "applicant_from_mapping"]
