"""LanguageDetector: the languages of the markets served, the script shortcut, the sample, the cache."""

from __future__ import annotations

import random

import numpy as np
import pytest

from metering.language import (
    CACHE_SIZE,
    DEFAULT_LANGUAGES,
    SAMPLE_CHARS,
    UNDETERMINED,
    LanguageDetector,
    _prune,
)

# Two or three prompts per language, written the way users write them.
SENTENCES: dict[str, list[str]] = {
    "en": ["Hello, can you help me write a short email to my manager about the project deadline?",
           "Please summarize the attached contract and list the payment terms in a table.",
           "What is the difference between a letter of credit and a bank guarantee?"],
    "zh": ["请帮我写一封邮件给我们在哈萨克斯坦的客户，介绍我们的新产品，并说明价格和交货时间。",
           "你好，今天的天气怎么样？我想去公园散步，然后和朋友一起吃饭。",
           "请把下面这段合同条款翻译成英文，并指出其中可能存在的法律风险。"],
    "ru": ["Здравствуйте! Помогите, пожалуйста, составить договор поставки оборудования из Китая в Россию.",
           "Привет! Как у тебя дела сегодня? Расскажи мне что-нибудь интересное.",
           "Объясни, чем отличается аккредитив от банковской гарантии, и приведи примеры."],
    "uk": [("Добрий день! Допоможіть, будь ласка, написати лист нашому партнерові щодо умов постачання "
           "товарів."),
           "Поясніть, будь ласка, як правильно оформити рахунок-фактуру для іноземного клієнта.",
           "Я хочу дізнатися більше про податкові пільги для малого бізнесу в Україні."],
    "kk": ["Сәлеметсіз бе! Маған Қытайдан келетін тауарлар туралы қысқа есеп жазуға көмектесіңізші.",
           "Қазақстан Республикасының астанасы Астана қаласы болып табылады.",
           "Бүгін ауа райы жақсы, сондықтан біз саябаққа серуендеуге барамыз."],
    "uz": [("Assalomu alaykum! Iltimos, menga Xitoydan keladigan mahsulotlar haqida qisqacha hisobot "
           "yozishga yordam bering."),
           "O'zbekiston Respublikasining poytaxti Toshkent shahri hisoblanadi.",
           "Bugun havo yaxshi, shuning uchun biz bog'da sayr qilishga boramiz."],
    "ky": ["Саламатсызбы! Мага Кытайдан келген товарлар жөнүндө кыскача отчет жазууга жардам бериңизчи.",
           "Кыргыз Республикасынын борбору Бишкек шаары болуп саналат.",
           "Бүгүн аба ырайы жакшы, ошондуктан биз сейил бакка сейилдөөгө барабыз."],
    "tg": ["Салом! Лутфан ба ман барои навиштани мактуб ба шарикони тиҷоратии мо дар Тоҷикистон кӯмак кунед.",
           "Пойтахти Ҷумҳурии Тоҷикистон шаҳри Душанбе мебошад.",
           "Имрӯз ҳаво хуб аст, бинобар ин мо ба боғ барои сайр меравем."],
    "tk": ["Salam! Maňa Hytaýdan gelýän harytlar barada gysga hasabat ýazmaga kömek ediň.",
           "Türkmenistanyň paýtagty Aşgabat şäheridir.",
           "Şu gün howa gowy, şonuň üçin biz seýilgähe gezelenje gidýäris."],
    "az": ["Salam! Zəhmət olmasa, mənə Çindən gələn mallar haqqında qısa hesabat yazmağa kömək edin.",
           "Azərbaycan Respublikasının paytaxtı Bakı şəhəridir.",
           "Bu gün hava yaxşıdır, ona görə də biz parkda gəzməyə gedirik."],
    "tr": ["Merhaba, bugün nasılsın? Umarım her şey yolundadır ve günün güzel geçiyordur.",
           "Lütfen bana Çin'den gelen ürünler hakkında kısa bir rapor yazmamda yardım et.",
           "Türkiye Cumhuriyeti'nin başkenti Ankara'dır."],
    "ar": ["مرحبا، هل يمكنك مساعدتي في كتابة رسالة قصيرة إلى مديري حول موعد تسليم المشروع؟",
           "مرحبا، كيف حالك اليوم؟ أتمنى أن تكون بخير وأن يكون يومك سعيدا.",
           "ما هو الفرق بين خطاب الاعتماد والضمان البنكي؟"],
    "fa": ["سلام، لطفاً به من کمک کنید یک نامه کوتاه به مدیرم درباره مهلت تحویل پروژه بنویسم.",
           "پایتخت ایران شهر تهران است و جمعیت زیادی دارد.",
           "امروز هوا خوب است، بنابراین ما برای قدم زدن به پارک می‌رویم."],
    "hi": [("नमस्ते, क्या आप मेरे प्रबंधक को परियोजना की समय सीमा के बारे में एक छोटा ईमेल लिखने में मेरी मदद कर "
           "सकते हैं?"),
           "भारत की राजधानी नई दिल्ली है।",
           "आज मौसम अच्छा है, इसलिए हम पार्क में टहलने जा रहे हैं।"],
    "de": [("Hallo, kannst du mir helfen, eine kurze E-Mail an meinen Vorgesetzten über die Projektfrist zu "
           "schreiben?"),
           "Bitte fasse den beigefügten Vertrag zusammen und liste die Zahlungsbedingungen auf.",
           "Das Wetter ist heute schön, deshalb gehen wir im Park spazieren."],
    "fr": [("Bonjour, pouvez-vous m'aider à écrire un court courriel à mon responsable au sujet de "
           "l'échéance du projet ?"),
           "Veuillez résumer le contrat ci-joint et énumérer les conditions de paiement.",
           "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc."],
    "es": ["Hola, ¿puedes ayudarme a escribir un correo breve a mi jefe sobre la fecha límite del proyecto?",
           "Por favor, resume el contrato adjunto y enumera las condiciones de pago.",
           "Hoy hace buen tiempo, así que vamos a pasear por el parque."],
    "pt": ["Olá, você pode me ajudar a escrever um e-mail curto para o meu gerente sobre o prazo do projeto?",
           "Por favor, resuma o contrato anexo e liste as condições de pagamento.",
           "Hoje o tempo está bom, então vamos passear no parque."],
    "it": ["Ciao, puoi aiutarmi a scrivere una breve email al mio responsabile sulla scadenza del progetto?",
           "Per favore, riassumi il contratto allegato ed elenca le condizioni di pagamento.",
           "Oggi il tempo è bello, quindi andiamo a fare una passeggiata nel parco."],
    "ja": ["こんにちは、プロジェクトの締め切りについて上司に送る短いメールを書くのを手伝ってください。",
           "添付の契約書を要約して、支払条件を表にまとめてください。",
           "今日は天気がいいので、公園を散歩しに行きます。"],
    "ko": ["안녕하세요, 프로젝트 마감일에 대해 상사에게 보낼 짧은 이메일을 작성하는 것을 도와주세요.",
           "첨부된 계약서를 요약하고 지불 조건을 표로 정리해 주세요.",
           "오늘은 날씨가 좋아서 공원에 산책하러 갑니다."],
    # Indonesian and Malay are close: the model tells them apart on most prompts, not all.
    "id": [("Halo, bisakah kamu membantu saya menulis email singkat kepada atasan saya tentang tenggat waktu "
           "proyek?"),
           "Hari ini cuacanya cerah, jadi kami akan berjalan-jalan di taman."],
    "ms": [("Helo, bolehkah anda membantu saya menulis e-mel ringkas kepada pengurus saya mengenai tarikh "
           "akhir projek?"),
           "Sila ringkaskan kontrak yang dilampirkan dan senaraikan syarat pembayaran."],
    "vi": ["Xin chào, bạn có thể giúp tôi viết một email ngắn gửi quản lý về thời hạn của dự án không?",
           "Vui lòng tóm tắt hợp đồng đính kèm và liệt kê các điều khoản thanh toán.",
           "Hôm nay trời đẹp, vì vậy chúng tôi sẽ đi dạo trong công viên."],
    "th": ["สวัสดีครับ ช่วยเขียนอีเมลสั้นๆ ถึงผู้จัดการของผมเกี่ยวกับกำหนดส่งงานของโครงการได้ไหมครับ",
           "กรุณาสรุปสัญญาที่แนบมาและระบุเงื่อนไขการชำระเงิน",
           "วันนี้อากาศดี เราจึงจะไปเดินเล่นที่สวนสาธารณะ"],
}  # fmt: skip
CASES = [(lang, text) for lang, texts in SENTENCES.items() for text in texts]
SCRIPT_SHORTCUT = {"zh", "ja", "ko", "th"}


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector()


def test_every_default_language_is_tested() -> None:
    assert set(SENTENCES) == set(DEFAULT_LANGUAGES)
    assert all(len(code) == 2 for code in DEFAULT_LANGUAGES)


@pytest.mark.parametrize(("lang", "text"), CASES)
def test_a_prompt_in_each_default_language(detector: LanguageDetector, lang: str, text: str) -> None:
    assert detector.detect(text) == lang


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_the_first_sample_chars_of_a_long_prompt_are_enough(detector: LanguageDetector, lang: str) -> None:
    text = " ".join(SENTENCES[lang] * 4)
    assert len(text) > SAMPLE_CHARS
    assert detector.detect(text) == lang
    assert detector.detect(text[:100]) == lang  # even half a sample


@pytest.mark.parametrize("lang", sorted(SCRIPT_SHORTCUT))
def test_the_script_shortcut_agrees_with_the_model(detector: LanguageDetector, lang: str) -> None:
    for text in SENTENCES[lang]:
        assert detector._classify(text.encode()) == lang


@pytest.mark.parametrize(
    "text",
    [
        # English with a little Chinese
        "Please explain what 你好 and 谢谢 mean when I greet a client in Shanghai.",
        "Please explain the meaning of こんにちは in a business email to a Japanese client.",
        "Can you translate 감사합니다 into English and tell me when to use it?",
    ],
)
def test_a_few_foreign_characters_do_not_take_the_shortcut(detector: LanguageDetector, text: str) -> None:
    assert detector._by_script(text.encode()) is None


@pytest.mark.parametrize("text", ["", "hi", "   ok   ", "привет", "你好", "12345678901", "\n\n\t   x  \n"])
def test_short_text_is_undetermined(detector: LanguageDetector, text: str) -> None:
    assert detector.detect(text) == UNDETERMINED


@pytest.mark.parametrize(
    "text",
    [
        "1234567890 0987654321 12345",
        '{"id": 12345, "items": [1, 2, 3], "ok": true, "n": null}',
        "🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂",
        "............ ---------- ////////",
    ],
)
def test_text_without_language_is_undetermined(detector: LanguageDetector, text: str) -> None:
    assert detector.detect(text) == UNDETERMINED


@pytest.mark.parametrize(
    "text",
    [
        "Dzień dobry, czy możesz mi pomóc napisać krótki e-mail do mojego kierownika?",  # Polish
        "გამარჯობა, შეგიძლიათ დამეხმაროთ მოკლე წერილის დაწერაში ჩემი მენეჯერისთვის?",  # Georgian
        "Բարև, կարող եք օգնել ինձ գրել կարճ նամակ իմ ղեկավարին նախագծի ժամկետի մասին:",  # Armenian
        "Сайн байна уу, та надад менежертээ богино захидал бичихэд туслаач.",  # Mongolian
        "שלום, האם תוכל לעזור לי לכתוב מייל קצר למנהל שלי על המועד האחרון של הפרויקט?",  # Hebrew
        "Γεια σας, μπορείτε να με βοηθήσετε να γράψω ένα σύντομο email στον προϊστάμενό μου;",  # Greek
        "வணக்கம், எனது மேலாளருக்கு ஒரு சிறிய மின்னஞ்சல் எழுத உதவ முடியுமா?",  # Tamil
        "السلام علیکم، کیا آپ میرے مینیجر کو ایک مختصر ای میل لکھنے میں میری مدد کر سکتے ہیں؟",  # Urdu
        "def f(x):\n    return [i * 2 for i in range(x) if i % 3 == 0]\n",
        "hello \ud800 world, a lone surrogate \udfff in the middle",
        "\x00\x01\x02 binary-ish \x7f\x80\x9f text \uffff\U0010ffff",
        "ПОЖАЛУЙСТА, ОТВЕТЬТЕ БЫСТРО, ЭТО ОЧЕНЬ СРОЧНО",
        "a" * 10_000,
    ],
)
def test_other_text_gets_a_language_of_the_set_or_und(detector: LanguageDetector, text: str) -> None:
    assert detector.detect(text) in detector.languages | {UNDETERMINED}


def test_scripts_no_market_language_uses_are_mostly_undetermined(detector: LanguageDetector) -> None:
    assert detector.detect("გამარჯობა, შეგიძლიათ დამეხმაროთ მოკლე წერილის დაწერაში?") == UNDETERMINED
    assert detector.detect("שלום, האם תוכל לעזור לי לכתוב מייל קצר למנהל שלי?") == UNDETERMINED


def test_the_same_answers_as_py3langid_restricted_to_the_same_languages(detector: LanguageDetector) -> None:
    """Dropping features unseen in every language kept does not change one answer (all prefixes)."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    reference = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE)
    reference.set_languages([*DEFAULT_LANGUAGES, "zxx"])
    compared = 0
    for _lang, text in CASES:
        for end in range(12, len(text) + 1, 7):
            want, _ = reference.classify(text[:end])
            assert detector._classify(text[:end].encode()) == ("und" if want == "zxx" else want), text[:end]
            compared += 1
    assert compared > 500


def test_the_rebuilt_automaton_finds_exactly_py3langids_features() -> None:
    """With every feature kept, the rebuilt automaton counts the same features on any text."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier, visit_counts
    from py3langid.modelio import load_model

    ptc, _pc, _classes, nextmove, row, out = load_model(MODEL_DIR / MODEL_FILE)
    table, moves, rowbase, emits = _prune(
        np.frombuffer(nextmove, dtype=np.uint32 if nextmove.itemsize == 4 else np.uint16).reshape(-1, 256),
        np.frombuffer(row, dtype=np.uint32 if row.itemsize == 4 else np.uint16).astype(np.int64),
        np.asarray(out, dtype=np.int64),
        np.ones(len(ptc), dtype=bool),
    )
    ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE)
    rng = random.Random(7)
    blocks = [(32, 126), (0x400, 0x4FF), (0x600, 0x6FF), (0x4E00, 0x9FFF), (0xA0, 0x24F), (0x10A0, 0x10FF),
              (0x1F600, 0x1F64F), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0E00, 0x0E7F)]  # fmt: skip
    texts = [text for _lang, text in CASES]
    texts += [
        "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 200))) for _ in range(200)
    ]
    for text in texts:
        data = ident._encode(text)
        want = dict(visit_counts(ident.tk_nextmove, ident._rowbase, ident.tk_output, data) or {})
        got: dict[int, int] = {}
        state = 0
        for byte in data.translate(table):
            state = moves[rowbase[state] + byte]
            if emits[state] != len(ptc):
                got[int(emits[state])] = got.get(int(emits[state]), 0) + 1
        assert got == want, text


def test_a_smaller_set_of_languages() -> None:
    small = LanguageDetector(["en", "ru"], cache_size=2)
    assert small.languages == {"en", "ru"}
    assert small.detect(SENTENCES["ru"][0]) == "ru"
    assert small.detect(SENTENCES["kk"][0]) in {"ru", UNDETERMINED}  # no Kazakh: the nearest
    assert small.detect(SENTENCES["zh"][0]) in {
        "en",
        "ru",
        UNDETERMINED,
    }  # no shortcut to a language not served
    assert small.detect(SENTENCES["de"][0]) in {"en", "ru", UNDETERMINED}
    for text in SENTENCES["en"]:
        assert small.detect(text) == "en"
    assert small._cached.cache_info().currsize == 2  # bounded


def test_unknown_languages_are_refused() -> None:
    with pytest.raises(ValueError, match="no model for"):
        LanguageDetector(["en", "xx"])
    with pytest.raises(ValueError, match="at least one"):
        LanguageDetector([])


def test_answers_are_cached_per_sample(detector: LanguageDetector) -> None:
    assert detector._cached.cache_info().maxsize == CACHE_SIZE
    text = SENTENCES["tr"][0] + " " * SAMPLE_CHARS + "tail that is not read"
    hits = detector._cached.cache_info().hits
    assert detector.detect(text) == detector.detect(text[:SAMPLE_CHARS] + "another tail") == "tr"
    assert detector._cached.cache_info().hits == hits + 1
