import base64
from collections.abc import Callable

import pytest

from billing.documents import Invoice
from billing.engine import UsageQuantity, finalize
from billing.parties import Buyer, Seller
from billing.render.zatca import decode_tlv, document_fields, document_qr, qr_png_data_uri, tlv_base64
from metering.events import TokenType

SALLA = [(1, "Salla"), (2, "1234567891"), (3, "2021-07-12T14:25:09Z"), (4, "100.00"), (5, "15.00")]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (SALLA, "AQVTYWxsYQIKMTIzNDU2Nzg5MQMUMjAyMS0wNy0xMlQxNDoyNTowOVoEBjEwMC4wMAUFMTUuMDA="),
        (
            [(1, "سلة"), *SALLA[1:]],
            "AQbYs9mE2KkCCjEyMzQ1Njc4OTEDFDIwMjEtMDctMTJUMTQ6MjU6MDlaBAYxMDAuMDAFBTE1LjAw",
        ),
        (
            [
                (1, "Tianjin Example LLM Co."),
                (2, "300000000000003"),
                (3, "2025-07-01T08:00:00Z"),
                (4, "1150.00"),
                (5, "150.00"),
            ],
            "ARdUaWFuamluIEV4YW1wbGUgTExNIENvLgIPMzAwMDAwMDAwMDAwMDAzAxQyMDI1LTA3LTAxVDA4OjAwOjAwWgQHMTE1MC4wMAUGMTUwLjAw",
        ),
    ],
)
def test_reference_vectors_byte_exact(fields: list[tuple[int, str]], expected: str) -> None:
    payload = tlv_base64(fields)
    assert payload == expected
    assert base64.b64decode(payload) == base64.b64decode(expected)
    assert decode_tlv(payload) == fields


def test_first_vector_hex_layout() -> None:
    raw = base64.b64decode(tlv_base64(SALLA))
    assert raw.hex().startswith("010553616c6c61020a31323334353637383931031432303231")
    assert len(tlv_base64([(1, "سلة")])) == 12  # 2 + 6 bytes -> 8 bytes -> 12 Base64 chars


def test_limits() -> None:
    with pytest.raises(ValueError, match="255"):
        tlv_base64([(1, "x" * 256)])
    with pytest.raises(ValueError, match="one byte"):
        tlv_base64([(256, "x")])
    with pytest.raises(ValueError, match="truncated"):
        decode_tlv(base64.b64encode(bytes([1, 5, 65])).decode())


def test_invoice_qr_states_sar_amounts(
    january: Callable[..., Invoice],
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    with_registration: Callable[[Seller, str, str], Seller],
) -> None:
    sa_seller = with_registration(seller, "SA", "310000000000003")
    usage = [UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 100_000_000)]
    invoice = finalize(
        january(usage, make_buyer("SA", language="ar"), seller=sa_seller), "TP-INV-2026-000009"
    )
    # 30.00 USD at 15 % = 4.50 USD; in SAR at 3.75: taxable 112.50, VAT 16.875 -> 16.88, total 129.38
    assert document_fields(invoice) == [
        (1, "Tokenport (Tianjin) Technology Co., Ltd."),
        (2, "310000000000003"),
        (3, "2026-02-01T00:00:00Z"),
        (4, "129.38"),
        (5, "16.88"),
    ]
    assert decode_tlv(document_qr(invoice))[3] == (4, "129.38")
    assert qr_png_data_uri(document_qr(invoice)).startswith("data:image/png;base64,")


def test_qr_without_sa_registration_uses_home_tax_id(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    usage = [UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 100_000_000)]
    invoice = january(usage, make_buyer("SA", "300000000000003"))
    fields = dict(document_fields(invoice))
    assert fields[2] == "91120116MA05T8QX3G" and fields[4] == "112.50" and fields[5] == "0.00"
    kz = january(usage, make_buyer("KZ", "940140000385"))
    assert dict(document_fields(kz))[4] == "30.00"
