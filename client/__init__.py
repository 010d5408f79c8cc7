"""secagg.client: take part in secure-aggregation rounds from an app.

    from secagg.client import Client
    outcome = Client("host:50051", ca_cert="ca.pem", identity_key="me.identity", client_id="me").participate(update)
"""

from secagg.protocol.policy import ClientPolicy

from .api import AsyncClient, Client, RoundInfo, RoundOutcome
from .arrays import Layout, flatten, unflatten
from .errors import ClientError, ConnectionFailed, CredentialsError, PolicyRefused, Rejected, RoundAborted, RoundFailed

__all__ = ["AsyncClient", "Client", "ClientError", "ClientPolicy", "ConnectionFailed", "CredentialsError", "Layout", "PolicyRefused", "Rejected", "RoundAborted",
           "RoundFailed", "RoundInfo", "RoundOutcome", "flatten", "unflatten"]
