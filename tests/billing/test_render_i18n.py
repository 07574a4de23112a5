"""Buyer-language documents: the catalogue is complete in en, zh, ru, ar, kk, uz, tr; Kazakh, Uzbek
(Latin) and Turkish invoices, credit notes, tax wording and export reports."""

import dataclasses
import string
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from types import MappingProxyType

import pytest
from lxml import html as lxml_html

from billing.documents import Invoice
from billing.engine import UsageQuantity, build_credit_note, finalize
from billing.parties import Buyer
from billing.render.html import to_html
from billing.render.i18n import Localizer, catalogue, languages, tax_wording
from billing.render.report import render_report
from billing.reports import ExportGroup, ExportReport, GroupBy
from billing.tax import Treatment
from metering.events import TokenType

LANGUAGES = {"en", "zh", "ru", "ar", "kk", "uz", "tr"}
USAGE = [
    UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 150_000_000),
    UsageQuantity("qwen2.5-7b-instruct", TokenType.OUTPUT, 60_000_000),
]
TAX_IDS = {"KZ": "940140000385", "UZ": "302936161", "TR": "1234567890"}


def visible(html: str) -> str:
    return str(lxml_html.document_fromstring(html).text_content())


def fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.fixture()
def invoice_in(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> Callable[[str, str], Invoice]:
    def make(country: str, language: str) -> Invoice:
        return finalize(
            january(USAGE, make_buyer(country, TAX_IDS.get(country), language=language)),
            "TP-INV-2026-000042",
        )

    return make


def test_every_message_key_in_every_language() -> None:
    table = catalogue()
    assert set(languages()) == LANGUAGES
    english = table["en"]
    for language, labels in table.items():
        assert set(labels) == set(english), (language, set(english) ^ set(labels))
        for key, text in labels.items():
            assert isinstance(text, str) and text.strip(), (language, key)
            assert fields(text) == fields(english[key]), (language, key)  # same placeholders


def test_tax_wording_for_every_treatment_in_every_language() -> None:
    wording = tax_wording()
    assert set(wording) == {t.value for t in Treatment}
    for treatment, texts in wording.items():
        assert set(texts) == LANGUAGES, treatment
        for language, text in texts.items():
            assert fields(text) <= {"country", "rate"}, (treatment, language)
    # the VAT abbreviations a Kazakh, Uzbek and Turkish reader expects
    assert all("ҚҚС" in text for text in wording_in("kk"))
    assert all("QQS" in text for text in wording_in("uz"))
    assert all("KDV" in text for text in wording_in("tr"))


def wording_in(language: str) -> list[str]:
    return [texts[language] for texts in tax_wording().values()]


def test_language_codes_map_to_their_script() -> None:
    assert str(Localizer.for_language("uz").locale) == "uz_Latn"
    assert str(Localizer.for_language("uz-Latn").locale) == "uz_Latn"
    assert Localizer.for_language("uz").t("invoice") == "Hisob-faktura"
    assert str(Localizer.for_language("kk-KZ").locale) == "kk_Cyrl"
    assert Localizer.for_language("kk-KZ").t("invoice") == "Шот-фактура"
    assert Localizer.for_language("tr").percent(Decimal(20)) == "%20"


def test_kazakh_invoice(invoice_in: Callable[[str, str], Invoice]) -> None:
    html = to_html(invoice_in("KZ", "kk"))
    assert '<html lang="kk" dir="ltr">' in html
    text = visible(html)
    for wanted in (
        "Шот-фактура",
        "Нөмірі",
        "Жазылған күні",
        "2026\u202fж. 1 ақпан",  # CLDR kk long date
        "Айналым жасалған күн",
        "Қазақстан",
        "Заңды тұлға",
        "Салықтық сәйкестендіру нөмірі: 940140000385",
        "qwen2.5-7b-instruct — кіріс токендері; саты 1 (сатылы)",
        "100\xa0000\xa0000",
        "30,00\xa0$",
        "Салықсыз сомасы",
        "Барлығы",
        "90,00\xa0$",
        # KZ B2B: reverse charge, wording from the catalogue (the rules file has no kk text)
        "Кері есептеу: ҚҚС-ты (KZ, 16 %) сатып алушы өзі есептейді және төлейді.",
        "Reverse charge: the customer accounts for the VAT (KZ, 16 %).",  # the English note below
        "Банктік аударым",
        "Пайдалану деректерінің бақылау сомасы",
    ):
        assert wanted in text, wanted


def test_uzbek_latin_invoice(invoice_in: Callable[[str, str], Invoice]) -> None:
    text = visible(to_html(invoice_in("UZ", "uz")))
    for wanted in (
        "Hisob-faktura",
        "Tuzilgan sana",
        "1-fevral, 2026",
        "Toʻlov muddati",
        "Oʻzbekiston",
        "Yuridik shaxs",
        "STIR: 302936161",
        "chiqish tokenlari",
        "Soliqsiz jami",
        "Jami",
        "QQS (UZ, 12 %) xaridor tomonidan soliq agenti sifatida ushlab qolinadi va toʻlanadi.",
        "Bank oʻtkazmasi",
    ):
        assert wanted in text, wanted
    assert not any("\u0400" <= ch <= "\u04ff" for ch in text)  # Latin script, no Cyrillic


def test_turkish_invoice(invoice_in: Callable[[str, str], Invoice]) -> None:
    text = visible(to_html(invoice_in("TR", "tr")))
    for wanted in (
        "Fatura",
        "Düzenleme tarihi",
        "1 Şubat 2026",
        "Türkiye",
        "Vergi kimlik numarası: 1234567890",
        "girdi tokenları",
        "$30,00",
        "Vergi (%0)",
        "Vergiler dahil toplam",
        "Sorumlu sıfatıyla beyan: KDV alıcı tarafından beyan edilir (TR, %20).",
        "Banka havalesi",
    ):
        assert wanted in text, wanted


def test_credit_notes_in_kazakh_uzbek_turkish(invoice_in: Callable[[str, str], Invoice]) -> None:
    expected = {
        "kk": ("Кредиттік нота", "Түзетілетін шот-фактура", "Себебі"),
        "uz": ("Kredit-nota", "Tuzatilayotgan hisob-faktura", "Sabab"),
        "tr": ("Alacak notu", "İlgili fatura", "Gerekçe"),
    }
    for language, labels in expected.items():
        note = build_credit_note(
            invoice_in("KZ", language), reason="Usage disputed", issue_date=date(2026, 2, 10)
        )
        text = visible(to_html(finalize(note, "TP-CRN-2026-000003")))
        for wanted in (*labels, "TP-INV-2026-000042", "TP-CRN-2026-000003", "Usage disputed"):
            assert wanted in text, (language, wanted)


def test_document_wording_wins_over_the_catalogue(invoice_in: Callable[[str, str], Invoice]) -> None:
    """The tax wording stored on an issued document is what it says; the catalogue only fills gaps."""
    inv = invoice_in("KZ", "kk")
    stored = dataclasses.replace(
        inv.taxes[0], wording=MappingProxyType({**inv.taxes[0].wording, "kk": "Сақталған мәтін."})
    )
    text = visible(to_html(dataclasses.replace(inv, taxes=(stored,))))
    assert "Сақталған мәтін." in text and "Кері есептеу" not in text


def test_export_report_in_every_language() -> None:
    report = ExportReport(
        period="2026-01",
        by=GroupBy.COUNTRY,
        groups=(ExportGroup("KZ", 7_000_000, Decimal("1.98"), (("USD", Decimal("0.28")),), 1),),
        quantity_tokens=7_000_000,
        revenue_cny=Decimal("1.98"),
    )
    expected = {
        "en": ("Token exports 2026-01", "Country", "Revenue (CNY)", "Kazakhstan (KZ)", "7,000,000"),
        "kk": (
            "2026-01 кезеңіндегі токен экспорты",
            "Ел",
            "Түсім (CNY)",
            "Қазақстан (KZ)",
            "7\xa0000\xa0000",
        ),
        "uz": ("2026-01 davri uchun token eksporti", "Mamlakat", "Tushum (CNY)", "Qozogʻiston (KZ)"),
        "tr": ("2026-01 dönemi token ihracatı", "Ülke", "Hasılat (CNY)", "Kazakistan (KZ)", "7.000.000"),
        "ru": ("Экспорт токенов за 2026-01", "Страна", "Выручка (CNY)", "Казахстан (KZ)"),
        "zh": ("2026-01 词元出口", "国家/地区", "收入（人民币）", "哈萨克斯坦 (KZ)", "¥1.98"),
        "ar": ("صادرات الرموز للفترة 2026-01", "الدولة", "الإيرادات (CNY)", "كازاخستان (KZ)"),
    }
    assert set(expected) == LANGUAGES
    for language, texts in expected.items():
        html = render_report(report, "html", language=language)
        assert f'<html lang="{language}"' in html
        text = visible(html)
        for wanted in texts:
            assert wanted in text, (language, wanted)
