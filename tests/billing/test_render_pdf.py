"""PDF documents: identical bytes on every render, a loud error instead of boxes when a font is missing,
the VOID mark, right-to-left pages that keep left-to-right data in order, and kk/uz/tr/ar/zh read back."""

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from billing.documents import DocumentStatus, Invoice
from billing.engine import UsageQuantity, finalize
from billing.parties import Buyer, Seller
from billing.render import render
from billing.render.fonts import MissingFonts
from billing.render.html import to_html
from metering.events import TokenType

pytestmark = pytest.mark.skipif(
    shutil.which("pdftotext") is None, reason="poppler-utils (pdftotext) not installed"
)

ROOT = Path(__file__).resolve().parents[2]
USAGE = [
    UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 150_000_000),
    UsageQuantity("smollm2-135m-instruct", TokenType.CACHED_INPUT, 1_234_567),
]
ACCOUNT = "2750 0001 0002 0003 0004"  # digit groups only: the case a right-to-left page reverses
TAX_IDS = {"KZ": "940140000385", "UZ": "302936161", "TR": "1234567890", "SA": "300000000000003"}


@pytest.fixture()
def invoice_in(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer], seller: Seller
) -> Callable[[str, str], Invoice]:
    bank = dataclasses.replace(seller.bank, account_number=ACCOUNT)
    issuer = dataclasses.replace(seller, bank=bank)

    def make(country: str, language: str) -> Invoice:
        currency = "CNY" if country == "CN" else "USD"
        who = make_buyer(
            country,
            TAX_IDS.get(country, "91110000600037341L" if country == "CN" else None),
            language=language,
            currency=currency,
        )
        return finalize(january(USAGE, who, seller=issuer), "TP-INV-2026-000042")

    return make


# pdftotext wraps right-to-left lines in invisible embedding controls (U+202A..U+202C): drop them
BIDI_CONTROLS = dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F])


def pdftotext(pdf: bytes, tmp_path: Path, *, layout: bool = True) -> str:
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf)
    args = ["pdftotext", *(["-layout"] if layout else []), str(path), "-"]
    return subprocess.run(args, capture_output=True, check=True, text=True).stdout.translate(BIDI_CONTROLS)


def pdfinfo(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "info.pdf"
    path.write_bytes(pdf)
    args = ["pdfinfo", "-isodates", str(path)]
    return subprocess.run(args, capture_output=True, check=True, text=True).stdout


def test_same_document_same_bytes(invoice_in: Callable[[str, str], Invoice], tmp_path: Path) -> None:
    inv = invoice_in("SA", "ar")
    first = render(inv, "pdf")
    assert render(inv, "pdf") == first
    # fixed metadata: the dates are the issue date, never the time of rendering
    info = pdfinfo(first, tmp_path)
    assert re.search(r"CreationDate:\s+2026-02-01T00:00:00", info), info
    assert re.search(r"ModDate:\s+2026-02-01T00:00:00", info), info
    assert "Title:           فاتورة TP-INV-2026-000042" in info
    # what is printed changes the bytes (not a constant)
    assert render(inv, "pdf", void_reference="TP-CRN-2026-000001") != first


def test_same_bytes_in_another_process(invoice_in: Callable[[str, str], Invoice], tmp_path: Path) -> None:
    inv = invoice_in("KZ", "kk")
    (tmp_path / "doc.json").write_bytes(render(inv, "json"))
    script = (
        "import json, sys, hashlib\n"
        "from billing.documents import Invoice\n"
        "from billing.render import render\n"
        "doc = Invoice.from_json_dict(json.loads(open(sys.argv[1], encoding='utf-8').read()))\n"
        "print(hashlib.sha256(render(doc, 'pdf')).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "doc.json")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert done.stdout.strip() == hashlib.sha256(render(inv, "pdf")).hexdigest()


def test_same_bytes_without_harfbuzz_subsetter(
    invoice_in: Callable[[str, str], Invoice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without libharfbuzz-subset WeasyPrint subsets with fontTools, which stamps each font with the
    current time: the render pins SOURCE_DATE_EPOCH, so the bytes still do not change."""
    import weasyprint.pdf.fonts

    monkeypatch.setattr(weasyprint.pdf.fonts, "harfbuzz_subset", None)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    inv = invoice_in("CN", "zh")
    first = render(inv, "pdf")
    assert render(inv, "pdf") == first
    assert "SOURCE_DATE_EPOCH" not in os.environ  # restored


@pytest.fixture()
def latin_only_fonts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fontconfig world with only Noto Sans (Latin, Cyrillic): no CJK, no Arabic font."""
    if shutil.which("fc-match") is None:
        pytest.skip("fontconfig's fc-match not installed")
    found = subprocess.run(
        ["fc-match", "-f", "%{file}", "Noto Sans"], capture_output=True, text=True, check=True
    ).stdout
    if "NotoSans-" not in found:
        pytest.skip("Noto Sans not installed")
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    (fonts / Path(found).name).symlink_to(found)
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        '<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
        f"<dir>{fonts}</dir><cachedir>{tmp_path / 'cache'}</cachedir></fontconfig>"
    )
    monkeypatch.setenv("FONTCONFIG_FILE", str(conf))


@pytest.mark.usefixtures("latin_only_fonts")
def test_a_missing_font_fails_loudly(invoice_in: Callable[[str, str], Invoice]) -> None:
    with pytest.raises(MissingFonts) as chinese:
        render(invoice_in("CN", "zh"), "pdf")
    message = str(chinese.value)
    assert "CJK" in message and "'Noto Sans CJK SC'" in message and "fonts-noto-cjk" in message
    assert ord("发") in chinese.value.codepoints  # 发票: the title itself
    assert chinese.value.scripts == ("CJK",)
    with pytest.raises(MissingFonts) as arabic:
        render(invoice_in("SA", "ar"), "pdf")
    assert set(arabic.value.scripts) == {"Arabic", "CJK"}  # the seller's Chinese name is on every page
    assert "'Noto Sans Arabic' (fonts-noto-core)" in str(arabic.value)


def test_void_invoice_carries_the_mark_and_the_credit_note(
    invoice_in: Callable[[str, str], Invoice], tmp_path: Path
) -> None:
    inv = invoice_in("KZ", "en")
    normal = pdftotext(render(inv, "pdf"), tmp_path)
    assert "VOID" not in normal and "Bank transfer" in normal
    void = pdftotext(render(inv, "pdf", void_reference="TP-CRN-2026-000009"), tmp_path)
    assert "VOID" in void
    assert "This document is void: cancelled by credit note TP-CRN-2026-000009. Do not pay." in void
    assert "Bank transfer" not in void and ACCOUNT not in void  # no payment instructions
    # the document's own status works too (no reference known), in the buyer's language
    voided = dataclasses.replace(invoice_in("KZ", "kk"), status=DocumentStatus.VOID)
    kk = pdftotext(render(voided, "pdf"), tmp_path)
    assert "КҮШІ ЖОЙЫЛДЫ" in kk and "Бұл құжаттың күші жойылды. Төлемеңіз." in kk
    assert "VOID" not in to_html(invoice_in("KZ", "en"))


def test_arabic_pdf_keeps_left_to_right_data_in_order(
    invoice_in: Callable[[str, str], Invoice], tmp_path: Path
) -> None:
    inv = invoice_in("SA", "ar")
    for layout in (True, False):
        text = pdftotext(render(inv, "pdf"), tmp_path, layout=layout)
        assert ACCOUNT in text, text  # reversed, it would read "0004 0003 0002 0001 2750"
        for data in ("TP-INV-2026-000042", "300000000000003", "91120116MA05T8QX3G", "SWIFT BKCHCNBJ200"):
            assert data in text, data
        assert "Tokenport (Tianjin) Technology Co., Ltd." in text
        assert "100,000,000" in text and "1,234,567" in text and "42.01 US$" in text


@pytest.mark.parametrize(
    ("country", "language", "expected"),
    [
        ("KZ", "kk", ("Шот-фактура", "Сатып алушы", "ҚҚС", "Қазақстан", "Барлығы", "42,01")),
        ("UZ", "uz", ("Hisob-faktura", "Toʻlov muddati", "QQS", "Oʻzbekiston", "Jami", "42,01")),
        ("TR", "tr", ("Fatura", "Vergi kimlik numarası", "KDV", "Türkiye", "Vergiler dahil toplam")),
        ("CN", "zh", ("发票", "开票日期", "购买方", "供应商代收增值税 6%（CN）。", "合计")),
    ],
)
def test_buyer_language_pdfs_read_back(
    invoice_in: Callable[[str, str], Invoice],
    tmp_path: Path,
    country: str,
    language: str,
    expected: tuple[str, ...],
) -> None:
    text = pdftotext(render(invoice_in(country, language), "pdf"), tmp_path)
    for wanted in (*expected, "TP-INV-2026-000042", "拓肯港（天津）科技有限公司"):
        assert wanted in text, (language, wanted)
