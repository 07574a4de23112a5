"""HTML in en/zh/ru/ar (+tr), PDF read back with pdftotext, CSV, and the render() dispatcher.

(kk/uz/tr documents and the catalogue: test_render_i18n.py; reproducible bytes, fonts, VOID and
bidi in PDFs: test_render_pdf.py.)"""

import csv
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest
from lxml import html as lxml_html

from billing.documents import Invoice
from billing.engine import UsageQuantity, build_credit_note, finalize
from billing.parties import Buyer
from billing.render import render
from billing.render.html import to_html
from billing.render.i18n import Localizer, languages
from billing.render.zatca import document_qr
from metering.events import TokenType

USAGE = [
    UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 150_000_000),
    UsageQuantity("qwen2.5-7b-instruct", TokenType.OUTPUT, 60_000_000),
    UsageQuantity("smollm2-135m-instruct", TokenType.CACHED_INPUT, 1_234_567),
]


def visible(html: str) -> str:
    """The page's text as a reader sees it (markup such as <bdi> isolates removed)."""
    return str(lxml_html.document_fromstring(html).text_content())


@pytest.fixture()
def invoice_for(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> Callable[[str, str], Invoice]:
    def make(country: str, language: str) -> Invoice:
        # CNY: 100M x 2.10 + 50M x 1.70 + 60M x 5.80 (volume tier 2) + 1,234,567 x 0.07 = 643.09; 6 % = 38.59
        tax_ids = {
            "RU": "7707083893",
            "SA": "300000000000003",
            "CN": "91110000600037341L",
            "KZ": "940140000385",
        }
        currency = "CNY" if country == "CN" else "USD"
        who = make_buyer(
            country,
            tax_ids.get(country),
            language=language,
            currency=currency,
            name="ООО Ромашка" if country == "RU" else None,
        )
        return finalize(january(USAGE, who), "TP-INV-2026-000042")

    return make


def test_html_english(invoice_for: Callable[[str, str], Invoice]) -> None:
    html = to_html(invoice_for("KZ", "en"))
    assert '<html lang="en" dir="ltr">' in html
    assert "'Noto Sans', 'Noto Sans CJK SC', 'Noto Sans Arabic'" in html
    text = visible(html)
    for wanted in (
        "Invoice",
        "TP-INV-2026-000042",
        "February 1, 2026",
        "Kazakhstan",
        "Business customer",
        "qwen2.5-7b-instruct — input tokens; tier 1 (graduated)",
        "100,000,000",
        "$0.30",
        "$30.00",
        "$90.01",
        "Reverse charge: the customer accounts for the VAT (KZ, 16 %).",
        "1 USD = 7.0830 CNY · 2026-01-01 · sample:PBOC-central-parity (ledger)",
        "BKCHCNBJ200",
    ):
        assert wanted in text, wanted
    assert "ZATCA" not in html


def test_html_chinese_russian_arabic(invoice_for: Callable[[str, str], Invoice]) -> None:
    zh = to_html(invoice_for("CN", "zh"))
    assert '<html lang="zh" dir="ltr">' in zh
    for text in (
        "发票",
        "开票日期",
        "2026年2月1日",
        "输入词元",
        "阶梯 1 (累进)",
        "¥643.09",
        "¥38.59",
        "¥681.68",
        "小计",
        "合计",
        "供应商代收增值税 6%（CN）。",
        "中国",
    ):
        assert text in visible(zh), text
    ru = visible(to_html(invoice_for("RU", "ru")))
    for text in (
        "Счёт",
        "1 февраля 2026\u202fг.",
        "ООО Ромашка",
        "входные токены",
        "90,01\xa0$",
        "Налог (22\xa0%)",  # Babel (CLDR) percent format
        "НДС 22 % начислен поставщиком (RU).",
        "Россия",
    ):
        assert text in ru, text
    ar = to_html(invoice_for("SA", "ar"))
    assert '<html lang="ar" dir="rtl">' in ar
    for text in (
        "فاتورة",
        "المملكة العربية السعودية",
        "احتساب عكسي",
        "الضريبة بعملة SAR",
        "رمز الاستجابة السريعة",
    ):
        assert text in visible(ar), text
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="ZATCA QR"', ar)
    assert f'data-tlv="{document_qr(invoice_for("SA", "ar"))}"' in ar


def test_every_catalogue_language_renders(invoice_for: Callable[[str, str], Invoice]) -> None:
    assert set(languages()) == {"en", "zh", "ru", "ar", "kk", "uz", "tr"}
    assert "Fatura" in to_html(invoice_for("KZ", "tr"))
    # unknown language: English labels, never a crash
    assert ">Invoice<" in to_html(invoice_for("KZ", "xx-unknown"))
    # a language Babel knows but the catalogue does not: its formats, English labels
    german = Localizer.for_language("de")
    assert german.t("invoice") == "Invoice" and german.number(1234567) == "1.234.567"


def test_line_descriptions(january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]) -> None:
    from billing.render.html import line_description

    inv = january(
        [UsageQuantity("smollm2-135m-instruct", TokenType.OUTPUT, 1_000_000)],
        make_buyer("KZ", "940140000385", tenant="t-sample-enterprise"),
        adjustments=[UsageQuantity("qwen2.5-7b-instruct", TokenType.OUTPUT, 60_000_000)],
    )
    ru = Localizer.for_language("ru")
    assert [line_description(line, ru) for line in inv.lines] == [
        "smollm2-135m-instruct — выходные токены",
        "qwen2.5-7b-instruct — выходные токены; поздние данные за прошлый период",  # contract: flat 0.75
        "Доплата до минимального обязательства",
    ]
    assert "Minimum commitment top-up" in to_html(inv, language="en")
    assert "qwen2.5-7b-instruct — output tokens; late usage of an earlier period" in visible(
        to_html(inv, language="en")
    )
    batch = january(
        [UsageQuantity("smollm2-135m-instruct", TokenType.OUTPUT, 1_000_000, batch=True)],
        make_buyer("KZ", "940140000385"),
    )
    assert [line_description(line, ru) for line in batch.lines] == [
        "smollm2-135m-instruct — выходные токены; Batch API (со скидкой)"
    ]
    assert "smollm2-135m-instruct — output tokens; Batch API (discounted)" in visible(
        to_html(batch, language="en")
    )


def test_credit_note_and_draft_html(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    draft = january(USAGE, make_buyer("KZ", "940140000385"))
    assert "DRAFT - not a valid tax document" in to_html(draft)
    note = build_credit_note(
        finalize(draft, "TP-INV-2026-000001"), reason="Duplicate", issue_date=date(2026, 2, 5)
    )
    html = to_html(finalize(note, "TP-CRN-2026-000001"), language="ru")
    assert "Кредит-нота" in html and "TP-INV-2026-000001" in html and "Duplicate" in html
    assert "АННУЛИРОВАН" not in html
    assert "Банковский перевод" not in html


def _pdftotext(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf)
    done = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, text=True
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils (pdftotext) not installed")
def test_pdf_reads_back(invoice_for: Callable[[str, str], Invoice], tmp_path: Path) -> None:
    en = _pdftotext(render(invoice_for("KZ", "en"), "pdf"), tmp_path)
    for text in (
        "Invoice",
        "TP-INV-2026-000042",
        "Tokenport (Tianjin) Technology Co., Ltd.",
        "$90.01",
        "拓肯港（天津）科技有限公司",
    ):
        assert text in en, text
    zh = _pdftotext(render(invoice_for("CN", "zh"), "pdf"), tmp_path)
    for text in ("发票", "开票日期", "2026年2月1日", "供应商代收增值税 6%（CN）。", "¥681.68"):
        assert text in zh, text
    ru = _pdftotext(render(invoice_for("RU", "ru"), "pdf"), tmp_path)
    for text in ("Счёт", "ООО Ромашка", "НДС 22 % начислен поставщиком (RU).", "1 февраля 2026"):
        assert text in ru, text
    ar = _pdftotext(render(invoice_for("SA", "ar"), "pdf"), tmp_path)
    # Arabic comes back in visual order with presentation forms: compare loosely
    assert re.search(r"[\u0600-\u06FF\uFB50-\uFDFF\uFE70-\uFEFF]{3}", ar)
    assert "TP-INV-2026-000042" in ar and "90.01" in ar and "337.54" in ar


def test_csv_rows_and_totals(invoice_for: Callable[[str, str], Invoice]) -> None:
    rows = list(csv.DictReader(io.StringIO(render(invoice_for("SA", "ar"), "csv").decode())))
    *rows, digest = rows  # the last row: the usage digest a tenant recomputes (README: Trust)
    assert (digest["row"], digest["reference"]) == ("usage_digest", invoice_for("SA", "ar").usage_digest)
    assert [r["row"] for r in rows] == ["1", "2", "3", "4", "subtotal", "tax", "tax_in_tax_currency", "total"]
    assert [r["amount"] for r in rows] == [
        "30.00",
        "12.00",
        "48.00",
        "0.01",
        "90.01",
        "0.00",
        "0.00",
        "90.01",
    ]
    assert rows[6]["currency"] == "SAR" and rows[5]["treatment"] == "reverse_charge"


def test_render_dispatch(invoice_for: Callable[[str, str], Invoice]) -> None:
    inv = invoice_for("KZ", "en")
    assert render(inv, "ubl").startswith(b"<?xml")
    assert render(inv, "html").startswith(b"<!DOCTYPE html>")
    assert render(inv, "pdf").startswith(b"%PDF")
    with pytest.raises(ValueError, match="unknown format 'docx'"):
        render(inv, "docx")
