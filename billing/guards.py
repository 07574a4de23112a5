"""What production mode refuses to issue (BillingService(production=True), settings `mode: production`).

- The sample issuer: configs/billing/issuer.yaml ships with `sample: true` (example company, example
  bank account); an invoice must carry the real seller.
- A sample FX rate: configs/billing/fx_rates.csv ships plausible rates whose sources start with
  `sample:`; an invoice must carry published rates (`tokenport fx import`). Every FX use of the draft
  (tax currency, ledger) is checked, derived rates included (`inverse:sample:...`, `cross:USD(sample:...)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billing.errors import DocumentStateError
from billing.parties import Seller


def refuse_sample_issuer(seller: Seller) -> None:
    if seller.sample:
        raise DocumentStateError(
            "production mode: the issuer is the shipped sample (configs/billing/issuer.yaml has "
            "`sample: true`): put the real company, tax id and bank account there and remove that line"
        )


def sample_rates(document: Mapping[str, Any] | None) -> str | None:
    """Why a draft may not be issued in production (a `sample:` FX rate on it), or None."""
    uses = (document or {}).get("fx") or []
    bad = sorted({str(u.get("source")) for u in uses if "sample:" in str(u.get("source", ""))})
    if not bad:
        return None
    return (
        f"production mode: FX rate(s) from sample sources ({', '.join(bad)}); import the published "
        "rates for the dates on the invoice with `tokenport fx import FILE`, then run and finalize again"
    )
