"""One relayed request's flow, the one way into it for every server: admission, then the relay (or the refusal)."""
from __future__ import annotations

from .admission.pipeline import Admission
from .admission.request import Kind
from .errors import GatewayError
from .exchange.answers import Answers
from .exchange.port import Exchange
from .upstream.relay import Relayer


class Director:
    """Runs the flow and never touches the bytes: those are the exchange's (its server's) and the relay's."""

    def __init__(self, admission: Admission, relayer: Relayer, answers: Answers):
        self.admission, self.relayer, self.answers = admission, relayer, answers

    async def serve(self, ex: Exchange, kind: Kind) -> None:
        """Every way out answers, counts and logs."""
        try:
            admitted = await self.admission.admit(ex, kind)
        except GatewayError as error:
            await self.answers.refuse(ex, error)
            return
        await self.relayer.relay(admitted, ex)
