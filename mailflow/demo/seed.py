"""A deterministic synthetic shop: customers, products, carts, cart items, orders and
their status history.

The data is generated with one ``numpy.random.default_rng(seed)`` stream, vectorised,
and written with dialect-neutral SQLAlchemy Core ``insert()`` executemany in chunks,
so the same call fills a SQLite file or a PostgreSQL database with the same rows.

Every timestamp is a naive UTC datetime relative to ``now``, so a fixed ``now`` makes
the shop (and therefore the abandoned-cart audience) reproducible to the row.

The default profile carries the dirt a real shop has: malformed and missing e-mail
addresses, addresses shared between customers (sometimes in another case), Unicode,
overly long and missing names, unknown locales, customers without marketing consent,
empty carts and carts whose total is 0. Every address is on a reserved example domain
(RFC 2606: example.com/.org/.net and their subdomains), so nothing real is addressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, Table, delete, func, insert, select, text

from mailflow.warehouse import schema

__all__ = [
    "BENCH_PROFILE",
    "DEFAULT_PROFILE",
    "SeedProfile",
    "SeedStats",
    "seed_shop",
]

log = logging.getLogger(__name__)

_Rng = np.random.Generator
_IntArray = np.ndarray[Any, np.dtype[np.int64]]
_BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR

#: The abandoned_cart trigger's default window, mirrored by ``SeedStats.abandoned_candidates``.
ABANDONED_MIN_IDLE = timedelta(hours=4)
ABANDONED_MAX_IDLE = timedelta(days=7)

_CHUNK_ROWS = 10_000


# --- profiles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedProfile:
    """Rates that shape the synthetic shop. Every ``*_rate`` is a share in [0, 1].

    ``idle_buckets`` is ``(weight, min_minutes, max_minutes)`` per bucket: a cart's idle
    time (now - updated_at) is drawn uniformly inside a bucket chosen by weight.
    """

    products: int = 200
    # customers
    bad_email_rate: float = 0.02  # malformed, empty or NULL
    duplicate_email_rate: float = 0.01  # customers reusing another customer's address
    duplicate_case_change_rate: float = 0.4  # of those, in another letter case
    null_first_name_rate: float = 0.01
    null_last_name_rate: float = 0.005
    long_name_rate: float = 0.002  # last names of 101-200 characters
    unknown_locale_rate: float = 0.003  # "xx", "", "klingon", ...
    english_locale_rate: float = 0.1  # non-English-country customers choosing "en"
    missing_country_rate: float = 0.005  # country NULL, timezone "UTC"
    no_consent_rate: float = 0.25
    zero_ltv_rate: float = 0.2  # never bought anything
    ltv_median: float = 120.0  # of the lognormal lifetime value, in currency units
    ltv_sigma: float = 1.1  # ~3 % of buyers end up VIPs (>= 1,000.00)
    history_days: int = 3 * 365  # customers.created_at spread
    # customers without carts or orders who signed up in the last 48 h (welcome candidates)
    recent_signup_rate: float = 0.01
    # carts
    cart_rate: float = 0.4  # customers with at least one cart
    extra_carts_mean: float = 0.25  # Poisson mean of further carts per cart owner
    max_carts_per_customer: int = 4
    idle_buckets: tuple[tuple[float, float, float], ...] = (
        (0.15, 1, 59),  # minutes: too fresh
        (0.15, 60, 180),  # 1-3 h: too fresh
        (0.10, 270, 330),  # ~5 h: inside the 4 h / 7 day window
        (0.30, 1 * 24 * 60, 6 * 24 * 60),  # 1-6 days: inside
        (0.30, 8 * 24 * 60, 30 * 24 * 60),  # 8-30 days: too old
    )
    empty_cart_rate: float = 0.03
    zero_price_cart_rate: float = 0.005  # every item at unit_price 0 -> cart total 0
    item_count_weights: tuple[float, ...] = (0.40, 0.25, 0.15, 0.12, 0.08)  # 1..5 items
    converted_rate: float = 0.30  # non-empty carts that became an order
    # orders
    orders_per_customer: float = 0.6  # Poisson mean of orders placed without a cart
    cancelled_rate: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"SeedProfile.{f.name}={value!r}: must be a share in [0, 1]")
        if self.products < 1:
            raise ValueError(f"SeedProfile.products={self.products!r}: must be at least 1")
        if self.bad_email_rate + self.duplicate_email_rate > 1.0:
            raise ValueError("SeedProfile.bad_email_rate + duplicate_email_rate must not exceed 1")
        if not self.idle_buckets or any(
            w < 0 or lo < 0 or hi < lo for w, lo, hi in self.idle_buckets
        ):
            raise ValueError(
                "SeedProfile.idle_buckets: need (weight >= 0, 0 <= min_minutes <= max_minutes)"
            )
        if sum(w for w, _, _ in self.idle_buckets) <= 0:
            raise ValueError("SeedProfile.idle_buckets: weights must not all be 0")
        if not self.item_count_weights or min(self.item_count_weights) < 0:
            raise ValueError("SeedProfile.item_count_weights: need non-negative weights")
        if sum(self.item_count_weights) <= 0:
            raise ValueError("SeedProfile.item_count_weights: weights must not all be 0")
        if self.max_carts_per_customer < 1:
            raise ValueError("SeedProfile.max_carts_per_customer: must be at least 1")
        for name in ("ltv_median", "ltv_sigma", "extra_carts_mean", "orders_per_customer"):
            if getattr(self, name) < 0:
                raise ValueError(f"SeedProfile.{name}: must not be negative")
        if self.history_days < 31:
            raise ValueError("SeedProfile.history_days: must be at least 31")


#: A realistic, dirty shop: ~0.14 abandoned-cart candidates per customer.
DEFAULT_PROFILE = SeedProfile()

#: For throughput benchmarks: (almost) every customer has exactly one non-empty,
#: unconverted cart idle between 5 h and 6 days, consents, and has a valid unique address.
BENCH_PROFILE = SeedProfile(
    bad_email_rate=0.001,
    duplicate_email_rate=0.0,
    no_consent_rate=0.0,
    cart_rate=1.0,
    extra_carts_mean=0.0,
    max_carts_per_customer=1,
    idle_buckets=((1.0, 300, 6 * 24 * 60),),
    empty_cart_rate=0.0,
    zero_price_cart_rate=0.0,
    converted_rate=0.0,
    orders_per_customer=0.2,
)


@dataclass(frozen=True)
class SeedStats:
    """What ``seed_shop`` wrote (rows added per table) and how long it took."""

    customers: int
    products: int
    carts: int
    cart_items: int
    orders: int
    #: Status changes (placed, shipped, delivered, cancelled) of those orders.
    order_status_history: int
    #: Carts the abandoned_cart trigger finds with its default parameters: idle more than
    #: 4 h and less than 7 days, at least one item, no order from that cart. Consent and
    #: address quality are not considered.
    abandoned_candidates: int
    seconds: float


# --- reference data ---------------------------------------------------------------------------


def _pool(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names as ``display=ascii`` words; without ``=`` the ASCII form is the lower-cased word."""
    display: list[str] = []
    ascii_: list[str] = []
    for word in spec.split():
        shown, _, plain = word.partition("=")
        shown = shown.replace("_", " ")
        display.append(shown)
        ascii_.append(plain or "".join(ch for ch in shown.lower() if ch.isalnum()))
    return tuple(display), tuple(ascii_)


# (first names, last names) per name group; the ASCII form feeds the e-mail local part.
_NAMES: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {
    "en": (
        _pool(
            "James Mary John Patricia Robert Jennifer Michael Linda David Elizabeth William "
            "Susan Olivia Liam Emma Noah Ava Chloé=chloe Zoë=zoe Seán=sean Siobhán=siobhan "
            "Renée=renee Aaliyah Mateo Priya Kwame"
        ),
        _pool(
            "Smith Johnson Williams Brown Jones Miller Davis Wilson Anderson Taylor Thomas "
            "Moore Martin Jackson White Harris Clark Lewis O'Brien=obrien O'Connor=oconnor "
            "McDonald Nguyen Patel Okafor Brontë=bronte"
        ),
    ),
    "de": (
        _pool(
            "Jürgen=juergen Björn=bjoern Jörg=joerg Günter=guenter Max Paul Leon Felix Lukas "
            "Anna Lena Lea Sophie Marie Hannah Mia Käthe=kaethe Anneliese Uwe Sören=soeren "
            "Özlem=oezlem"
        ),
        _pool(
            "Müller=mueller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz "
            "Hoffmann Schäfer=schaefer Koch Bauer Richter Klein Wolf Schröder=schroeder "
            "Neumann Weiß=weiss Krüger=krueger Groß=gross Yılmaz=yilmaz"
        ),
    ),
    "fr": (
        _pool(
            "François=francois Hélène=helene Amélie=amelie Léa=lea Chloé=chloe Camille Manon "
            "Jérôme=jerome Benoît=benoit Gaël=gael Noël=noel Louis Hugo Lucas Théo=theo "
            "Inès=ines Zoé=zoe Maëlle=maelle Cécile=cecile Anaïs=anais"
        ),
        _pool(
            "Martin Bernard Dubois Thomas Robert Richard Petit Durand Leroy Moreau "
            "Lefèvre=lefevre Fournier Girard Bonnet Mercier Faure Rousseau Blanc Guérin=guerin "
            "Müller=muller Bélanger=belanger Côté=cote"
        ),
    ),
    "es": (
        _pool(
            "José=jose María=maria Jesús=jesus Lucía=lucia Martín=martin Sofía=sofia "
            "Álvaro=alvaro Inés=ines Raúl=raul Ángel=angel Carmen Javier Pablo Elena "
            "Begoña=begona Iñaki=inaki Nuria Andrés=andres Valentina Camila"
        ),
        _pool(
            "García=garcia Fernández=fernandez González=gonzalez Rodríguez=rodriguez "
            "López=lopez Martínez=martinez Sánchez=sanchez Pérez=perez Gómez=gomez "
            "Martín=martin Jiménez=jimenez Ruiz Hernández=hernandez Díaz=diaz "
            "Muñoz=munoz Peña=pena Núñez=nunez Ibáñez=ibanez Castillo Vargas"
        ),
    ),
    "ja": (
        _pool(
            "翔太=shota 陽菜=hina 大翔=hiroto 結衣=yui 蓮=ren さくら=sakura 健=ken 美咲=misaki "
            "ユウキ=yuki 花子=hanako"
        ),
        _pool(
            "佐藤=sato 鈴木=suzuki 高橋=takahashi 田中=tanaka 伊藤=ito 渡辺=watanabe "
            "山本=yamamoto 中村=nakamura 小林=kobayashi 加藤=kato"
        ),
    ),
    "zh": (
        _pool("伟=wei 芳=fang 娜=na 秀英=xiuying 敏=min 静=jing 磊=lei 洋=yang 艳=yan 勇=yong"),
        _pool("王=wang 李=li 张=zhang 刘=liu 陈=chen 杨=yang 黄=huang 赵=zhao 吴=wu 周=zhou"),
    ),
    "ko": (
        _pool("민준=minjun 서연=seoyeon 도윤=doyun 지우=jiwoo 하준=hajun 서윤=seoyun"),
        _pool("김=kim 이=lee 박=park 최=choi 정=jung 강=kang"),
    ),
    "cyr": (
        _pool(
            "Александр=aleksandr Мария=maria Дмитрий=dmitry Анна=anna Сергей=sergey "
            "Ольга=olga Олена=olena Андрій=andriy Иван=ivan Татьяна=tatiana Георги=georgi "
            "Йордан=yordan"
        ),
        _pool(
            "Иванов=ivanov Смирнова=smirnova Кузнецов=kuznetsov Попова=popova "
            "Шевченко=shevchenko Коваленко=kovalenko Бондаренко=bondarenko Петров=petrov "
            "Соколова=sokolova Георгиев=georgiev Димитрова=dimitrova"
        ),
    ),
}

# country, locale, name group, weight, IANA timezones in that country.
_COUNTRIES: tuple[tuple[str, str, str, float, tuple[str, ...]], ...] = (
    (
        "US",
        "en",
        "en",
        0.30,
        (
            "America/New_York",
            "America/Chicago",
            "America/Denver",
            "America/Los_Angeles",
            "America/Phoenix",
        ),
    ),
    ("GB", "en", "en", 0.08, ("Europe/London",)),
    ("IE", "en", "en", 0.01, ("Europe/Dublin",)),
    ("CA", "en", "en", 0.03, ("America/Toronto", "America/Vancouver", "America/Edmonton")),
    ("AU", "en", "en", 0.02, ("Australia/Sydney", "Australia/Melbourne", "Australia/Perth")),
    ("DE", "de", "de", 0.16, ("Europe/Berlin",)),
    ("AT", "de", "de", 0.03, ("Europe/Vienna",)),
    ("CH", "de", "de", 0.02, ("Europe/Zurich",)),
    ("FR", "fr", "fr", 0.12, ("Europe/Paris",)),
    ("BE", "fr", "fr", 0.02, ("Europe/Brussels",)),
    ("ES", "es", "es", 0.08, ("Europe/Madrid", "Atlantic/Canary")),
    ("MX", "es", "es", 0.04, ("America/Mexico_City", "America/Monterrey", "America/Tijuana")),
    ("AR", "es", "es", 0.02, ("America/Argentina/Buenos_Aires",)),
    ("CO", "es", "es", 0.01, ("America/Bogota",)),
    # The shop's UI speaks en/de/fr/es only, so these customers picked English.
    ("JP", "en", "ja", 0.02, ("Asia/Tokyo",)),
    ("CN", "en", "zh", 0.01, ("Asia/Shanghai",)),
    ("KR", "en", "ko", 0.005, ("Asia/Seoul",)),
    ("UA", "en", "cyr", 0.01, ("Europe/Kyiv",)),
    ("RU", "en", "cyr", 0.01, ("Europe/Moscow",)),
    ("BG", "en", "cyr", 0.005, ("Europe/Sofia",)),
)

_UNKNOWN_LOCALES = ("xx", "", "klingon", "und", "zz")

# RFC 2606 reserved names only.
_EMAIL_DOMAINS = (
    ("example.com", 0.40),
    ("example.org", 0.20),
    ("example.net", 0.20),
    ("mail.example.com", 0.08),
    ("post.example.org", 0.06),
    ("inbox.example.net", 0.06),
)

_IMAGE_BASE = "https://cdn.example.com/img/products"

# category, SKU code, nouns, (median price, lognormal sigma)
_CATEGORIES: tuple[tuple[str, str, tuple[str, ...], tuple[float, float]], ...] = (
    ("Apparel", "APP", ("T-Shirt", "Hoodie", "Jacket", "Scarf", "Beanie", "Socks"), (35, 0.5)),
    ("Shoes", "SHO", ("Sneakers", "Boots", "Sandals", "Loafers", "Slippers"), (80, 0.4)),
    ("Home", "HOM", ("Throw Blanket", "Cushion", "Vase", "Candle", "Lamp", "Rug"), (45, 0.7)),
    (
        "Kitchen",
        "KIT",
        ("Espresso Cups", "Chef's Knife", "Skillet", "Teapot", "Crème Brûlée Torch"),
        (40, 0.6),
    ),
    ("Garden", "GAR", ("Planter", "Watering Can", "Pruning Shears", "Seed Kit"), (25, 0.6)),
    (
        "Electronics",
        "ELE",
        ("Headphones", "Speaker", "Charger", "Smart Plug", "E-Reader"),
        (90, 0.8),
    ),
    ("Beauty", "BEA", ("Face Serum", "Hand Cream", "Lip Balm", "Eau de Parfum"), (22, 0.6)),
    ("Sports", "SPO", ("Yoga Mat", "Water Bottle", "Running Belt", "Dumbbells"), (30, 0.6)),
    ("Books", "BOO", ("Cookbook", "Notebook", "Travel Guide", "Novel"), (18, 0.4)),
    ("Toys", "TOY", ("Puzzle", "Building Set", "Plush Bear", "Kite"), (24, 0.6)),
)
_ADJECTIVES = _pool(
    "Classic Organic Recycled Handmade Premium Everyday Nordic Vintage Compact Deluxe Café "
    "Bio Midnight Alpine Coastal Scandi"
)[0]
_COLOURS = _pool("Black White Navy Sage Terracotta Sand Charcoal Ivory Crimson Ocean Olive Blush")[
    0
]


# --- generation -------------------------------------------------------------------------------


_ObjArray = np.ndarray[Any, np.dtype[np.object_]]


@dataclass
class _Shop:
    """Column lists per table, ready for executemany."""

    customers: dict[str, list[Any]]
    products: dict[str, list[Any]]
    carts: dict[str, list[Any]]
    cart_items: dict[str, list[Any]]
    orders: dict[str, list[Any]]
    abandoned_candidates: int
    order_status_history: dict[str, list[Any]]


class _Lookup:
    """Word lists per group flattened into one array, to draw a word per row vectorised."""

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.words: _ObjArray = np.array([w for g in groups for w in g], dtype=object)
        self.sizes: _IntArray = np.array([len(g) for g in groups], dtype=np.int64)
        self.offsets: _IntArray = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def group(self, g: int) -> list[str]:
        start = int(self.offsets[g])
        return self.words[start : start + int(self.sizes[g])].tolist()  # type: ignore[no-any-return]

    def draw(self, rng: _Rng, group: _IntArray) -> _IntArray:
        """A random word index per row, within that row's group."""
        within = (rng.random(len(group)) * self.sizes[group]).astype(np.int64)
        return self.offsets[group] + within


_GROUPS = tuple(_NAMES)
_FIRST_SHOWN = _Lookup([_NAMES[g][0][0] for g in _GROUPS])
_FIRST_ASCII = _Lookup([_NAMES[g][0][1] for g in _GROUPS])
_LAST_SHOWN = _Lookup([_NAMES[g][1][0] for g in _GROUPS])
_LAST_ASCII = _Lookup([_NAMES[g][1][1] for g in _GROUPS])
_ZONES = _Lookup([c[4] for c in _COUNTRIES])
_COUNTRY_CODE = np.array([c[0] for c in _COUNTRIES], dtype=object)
_COUNTRY_LOCALE = np.array([c[1] for c in _COUNTRIES], dtype=object)
_COUNTRY_GROUP = np.array([_GROUPS.index(c[2]) for c in _COUNTRIES], dtype=np.int64)


def _weights(values: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(values, dtype=float)
    return w / w.sum()


def _timestamps(now: datetime, age_s: np.ndarray) -> list[datetime]:
    """``now - age`` for ages in seconds, as naive datetimes."""
    base = np.datetime64(now.replace(tzinfo=None), "us")
    stamps = base - age_s.astype("timedelta64[s]").astype("timedelta64[us]")
    return stamps.tolist()  # type: ignore[no-any-return]


def _null_where(mask: _BoolArray, values: np.ndarray) -> _ObjArray:
    """``values`` as objects with ``None`` where ``mask`` is set."""
    out: _ObjArray = values.astype(object)
    out[mask] = None
    return out


def _money(cents: np.ndarray) -> list[Decimal]:
    return [Decimal(c).scaleb(-2) for c in cents.tolist()]


def _lognormal_cents(rng: _Rng, median: float, sigma: float, n: int) -> _IntArray:
    return np.round(rng.lognormal(np.log(median), sigma, n) * 100).astype(np.int64)


def _pick(rng: _Rng, n: int, share: float, eligible: _BoolArray | None = None) -> _BoolArray:
    """A mask of ``round(n * share)`` rows chosen without replacement (among ``eligible``)."""
    mask = np.zeros(n, dtype=bool)
    candidates = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    k = min(len(candidates), round(n * share))
    if k:
        mask[rng.choice(candidates, size=k, replace=False)] = True
    return mask


@dataclass
class _Products:
    cols: dict[str, list[Any]]
    price_cents: _IntArray
    popularity: np.ndarray


def _make_products(rng: _Rng, profile: SeedProfile, id0: int) -> _Products:
    n = profile.products
    cat = rng.integers(0, len(_CATEGORIES), n)
    nouns = _Lookup([c[2] for c in _CATEGORIES])
    noun = nouns.words[nouns.draw(rng, cat)]
    adjective = np.array(_ADJECTIVES, dtype=object)[rng.integers(0, len(_ADJECTIVES), n)]
    colour = np.array(_COLOURS, dtype=object)[rng.integers(0, len(_COLOURS), n)]
    name = np.where(
        rng.random(n) < 0.6, adjective + " " + noun + ", " + colour, adjective + " " + noun
    )
    medians = np.array([c[3][0] for c in _CATEGORIES])[cat]
    sigmas = np.array([c[3][1] for c in _CATEGORIES])[cat]
    raw = np.exp(np.log(medians) + sigmas * rng.standard_normal(n))
    # Shop prices end in .99 or .00, never below 1.99.
    whole = np.maximum(np.floor(raw), 1).astype(np.int64)
    cents = np.maximum(whole * 100 + np.where(rng.random(n) < 0.7, 99, 0), 199)
    code = np.array([c[1] for c in _CATEGORIES], dtype=object)[cat]
    category = np.array([c[0] for c in _CATEGORIES], dtype=object)[cat]
    ids = np.arange(id0, id0 + n)
    sku = "MF-" + code + "-" + np.char.zfill(ids.astype(str), 6).astype(object)
    image = _IMAGE_BASE + "/" + np.char.lower(sku.astype(str)).astype(object) + ".jpg"
    # Popularity is Zipf-like over a random order of the catalogue.
    popularity = _weights(1.0 / (rng.permutation(n) + 3.0) ** 0.9)
    return _Products(
        cols={
            "id": ids.tolist(),
            "sku": sku.tolist(),
            "name": name.tolist(),
            "category": _null_where(rng.random(n) < 0.01, category).tolist(),
            "price": _money(cents),
            "image_url": _null_where(rng.random(n) < 0.02, image).tolist(),
        },
        price_cents=cents,
        popularity=popularity,
    )


def _long_name(rng: _Rng, lasts: Sequence[str]) -> str:
    """A compound surname just over 100 characters (String(200) holds it on every dialect)."""
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) <= 101:
        parts.append(lasts[int(rng.integers(0, len(lasts)))])
    return " ".join(parts)


# Ways a real address list goes wrong: (local part, domain) -> stored value.
_DIRT: tuple[Callable[[str, str], str | None], ...] = (
    lambda lo, d: f"{lo}{d}",  # missing @
    lambda lo, d: f"{lo.replace('.', ' ', 1) if '.' in lo else lo + ' '}@{d}",  # a space
    lambda lo, d: f" {lo}@{d} ",  # padded
    lambda lo, d: (
        f"{lo.replace('.', '..', 1)}@{d}" if "." in lo else f"{lo}@{d.replace('.', '..', 1)}"
    ),
    lambda lo, d: f"{lo}@{d}.",  # trailing dot
    lambda lo, d: "",
    lambda lo, d: None,
    lambda lo, d: f"{lo}@localhost",
    lambda lo, d: f"{lo}\u200b@{d}",  # zero-width space
    lambda lo, d: f"{lo}\uff20{d}",  # full-width at sign
    lambda lo, d: f"{lo}@@{d}",
    lambda lo, d: f"{lo}\ufffd@{d}",  # replacement character from a bad decode
)


def _change_case(address: str, kind: int) -> str:
    if kind == 0:
        return address.upper()
    if kind == 1:
        return address.capitalize()
    local, _, domain = address.partition("@")
    return f"{local}@{domain.upper()}"


@dataclass
class _Customers:
    cols: dict[str, list[Any]]
    age_s: _IntArray


def _make_customers(rng: _Rng, profile: SeedProfile, n: int, id0: int) -> _Customers:
    country = rng.choice(len(_COUNTRIES), size=n, p=_weights([c[3] for c in _COUNTRIES]))
    group = _COUNTRY_GROUP[country]
    first_i, last_i = _FIRST_SHOWN.draw(rng, group), _LAST_SHOWN.draw(rng, group)
    fa, la = _FIRST_ASCII.words[first_i], _LAST_ASCII.words[last_i]
    initial = np.array([w[0] for w in _FIRST_ASCII.words], dtype=object)[first_i]
    number = rng.integers(1, 100, n).astype(str).astype(object)
    pattern = rng.integers(0, 6, n)
    local = np.select(
        [pattern == k for k in range(5)],
        [fa + "." + la, fa + la + number, initial + la, fa + "_" + la + number, la + "." + fa],
        default=fa + "+shop",
    )
    domain_names = np.array([d[0] for d in _EMAIL_DOMAINS], dtype=object)
    domain = domain_names[
        rng.choice(len(_EMAIL_DOMAINS), size=n, p=_weights([d[1] for d in _EMAIL_DOMAINS]))
    ]
    # Chance collisions would be unplanned duplicates; the customer number makes them
    # unique, as a real sign-up form would have forced.
    ids = np.arange(id0, id0 + n)
    while n:
        _, first_seen = np.unique(
            np.char.lower((local + "@" + domain).astype(str)), return_index=True
        )
        clash = np.ones(n, dtype=bool)
        clash[first_seen] = False
        if not clash.any():
            break
        local[clash] = local[clash] + ids[clash].astype(str).astype(object)
    email = local + "@" + domain

    # Repeated addresses copy a well-formed one, sometimes in another letter case.
    bad = _pick(rng, n, profile.bad_email_rate)
    dup = _pick(rng, n, profile.duplicate_email_rate, eligible=~bad)
    sources = np.flatnonzero(~bad & ~dup)
    copies = email[rng.choice(sources, size=int(dup.sum()))] if len(sources) else email[dup]
    case_change = rng.random(len(copies)) < profile.duplicate_case_change_rate
    case_kind = rng.integers(0, 3, len(copies))
    email[dup] = [
        _change_case(a, k) if c else a
        for a, c, k in zip(copies.tolist(), case_change.tolist(), case_kind.tolist(), strict=True)
    ]
    dirt = rng.integers(0, len(_DIRT), n)
    for i in np.flatnonzero(bad).tolist():
        email[i] = _DIRT[dirt[i]](local[i], domain[i])

    null_first = _pick(rng, n, profile.null_first_name_rate)
    null_last = _pick(rng, n, profile.null_last_name_rate)
    first = _null_where(null_first, _FIRST_SHOWN.words[first_i])
    last = _null_where(null_last, _LAST_SHOWN.words[last_i])
    for i in np.flatnonzero(_pick(rng, n, profile.long_name_rate, eligible=~null_last)).tolist():
        last[i] = _long_name(rng, _LAST_SHOWN.group(int(group[i])))

    locale = np.where(rng.random(n) < profile.english_locale_rate, "en", _COUNTRY_LOCALE[country])
    unknown = _pick(rng, n, profile.unknown_locale_rate)
    unknown_locales = np.array(_UNKNOWN_LOCALES, dtype=object)
    locale = np.where(unknown, unknown_locales[rng.integers(0, len(_UNKNOWN_LOCALES), n)], locale)
    no_country = _pick(rng, n, profile.missing_country_rate)
    zone = _ZONES.words[_ZONES.draw(rng, country)]

    consent = ~_pick(rng, n, profile.no_consent_rate)
    ltv = _lognormal_cents(rng, profile.ltv_median, profile.ltv_sigma, n)
    ltv[rng.random(n) < profile.zero_ltv_rate] = 0
    age_s = rng.integers(0, profile.history_days * DAY, n)
    return _Customers(
        cols={
            "id": ids.tolist(),
            "email": email.tolist(),
            "first_name": first.tolist(),
            "last_name": last.tolist(),
            "locale": locale.tolist(),
            "timezone": np.where(no_country, "UTC", zone).tolist(),
            "country": _null_where(no_country, _COUNTRY_CODE[country]).tolist(),
            "marketing_consent": consent.tolist(),
            "lifetime_value": _money(ltv),
        },
        age_s=age_s,
    )


def _order_status(
    rng: _Rng, profile: SeedProfile, age_s: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Status from the order's age, and the age of its last update (never before creation)."""
    n = len(age_s)
    u = rng.random(n)
    frac = rng.random(n)
    status = np.where(
        age_s < DAY,
        "placed",
        np.where(
            age_s < 4 * DAY,
            np.where(u < 0.8, "shipped", "placed"),
            np.where(u < 0.93, "delivered", "shipped"),
        ),
    ).astype(object)
    cancelled = rng.random(n) < profile.cancelled_rate
    status[cancelled] = "cancelled"
    # Time from creation to the last status change, capped so updated_at <= now.
    delta = np.zeros(n, dtype=np.int64)
    delta = np.where(status == "shipped", (DAY + frac * 2 * DAY).astype(np.int64), delta)
    delta = np.where(status == "delivered", (2 * DAY + frac * 5 * DAY).astype(np.int64), delta)
    delta = np.where(status == "cancelled", (10 * MINUTE + frac * DAY).astype(np.int64), delta)
    delta = np.minimum(delta, age_s)
    return status.tolist(), age_s - delta


def _generate(
    rng: _Rng, profile: SeedProfile, n_customers: int, now: datetime, ids: dict[str, int]
) -> _Shop:
    prod = _make_products(rng, profile, ids["products"])
    cust = _make_customers(rng, profile, n_customers, ids["customers"])
    cust_age = cust.age_s
    n_products = profile.products

    # carts: owners, idle time (now - updated_at) and session length (updated - created)
    has_cart = rng.random(n_customers) < profile.cart_rate
    per_owner = np.minimum(
        1 + rng.poisson(profile.extra_carts_mean, n_customers), profile.max_carts_per_customer
    )
    per_customer = np.where(has_cart, per_owner, 0)
    cart_cust = np.repeat(np.arange(n_customers), per_customer)
    n_carts = len(cart_cust)
    buckets = np.asarray(profile.idle_buckets, dtype=float)
    bucket = rng.choice(len(buckets), size=n_carts, p=_weights(buckets[:, 0]))
    idle_min = buckets[bucket, 1] + rng.random(n_carts) * (buckets[bucket, 2] - buckets[bucket, 1])
    cart_idle = np.maximum(np.round(idle_min * MINUTE), 1).astype(np.int64)
    session = np.minimum(rng.lognormal(np.log(15 * MINUTE), 1.5, n_carts), 14 * DAY)
    cart_age = cart_idle + session.astype(np.int64)
    # A customer signs up before their first cart.
    signup_gap = rng.integers(MINUTE, 30 * DAY, n_carts)
    np.maximum.at(cust_age, cart_cust, cart_age + signup_gap)

    # items
    empty = rng.random(n_carts) < profile.empty_cart_rate
    zero_price = ~empty & (rng.random(n_carts) < profile.zero_price_cart_rate)
    counts = 1 + rng.choice(
        len(profile.item_count_weights), size=n_carts, p=_weights(profile.item_count_weights)
    )
    counts[empty] = 0
    item_cart = np.repeat(np.arange(n_carts), counts)
    item_product = rng.choice(n_products, size=len(item_cart), p=prod.popularity)
    qty = 1 + rng.choice(4, size=len(item_cart), p=_weights([0.80, 0.13, 0.05, 0.02]))
    # One line per product in a cart: keep the first draw of a repeated product.
    _, keep = np.unique(item_cart * n_products + item_product, return_index=True)
    keep.sort()
    item_cart, item_product, qty = item_cart[keep], item_product[keep], qty[keep]
    unit_cents = np.where(zero_price[item_cart], 0, prod.price_cents[item_product])
    cart_total = np.bincount(item_cart, weights=qty * unit_cents, minlength=n_carts)
    has_items = np.bincount(item_cart, minlength=n_carts) > 0

    # orders placed from a cart, created after the cart's last activity
    converted = has_items & (rng.random(n_carts) < profile.converted_rate)
    conv = np.flatnonzero(converted)
    delay = np.minimum(
        np.maximum(rng.lognormal(np.log(20 * MINUTE), 1.2, len(conv)), 1).astype(np.int64),
        cart_idle[conv],
    )
    conv_age = cart_idle[conv] - delay

    # orders without a cart, somewhere between sign-up and now
    n_plain = rng.poisson(profile.orders_per_customer, n_customers)
    plain_cust = np.repeat(np.arange(n_customers), n_plain)
    plain_age = (rng.random(len(plain_cust)) * cust_age[plain_cust]).astype(np.int64)
    plain_total = _lognormal_cents(rng, 60.0, 0.8, len(plain_cust))

    order_cust = np.concatenate([cart_cust[conv], plain_cust])
    order_cart = np.concatenate([conv, np.full(len(plain_cust), -1)])
    order_age = np.concatenate([conv_age, plain_age])
    order_total = np.concatenate([cart_total[conv].astype(np.int64), plain_total])
    status, order_updated_age = _order_status(rng, profile, order_age)

    # Drawn last, so the rest of the shop is the same with or without them: customers who
    # never carted or ordered anything, some of whom signed up in the last 48 h.
    no_activity = np.ones(n_customers, dtype=bool)
    no_activity[cart_cust] = False
    no_activity[order_cust] = False
    recent = _pick(rng, n_customers, profile.recent_signup_rate, eligible=no_activity)
    cust_age[recent] = rng.integers(MINUTE, 2 * DAY, int(recent.sum()))

    in_window = (cart_idle > ABANDONED_MIN_IDLE.total_seconds()) & (
        cart_idle < ABANDONED_MAX_IDLE.total_seconds()
    )
    candidates = int(np.count_nonzero(in_window & has_items & ~converted))

    c0, k0, i0, o0 = ids["customers"], ids["carts"], ids["cart_items"], ids["orders"]
    customers = cust.cols
    customers["created_at"] = _timestamps(now, cust_age)
    carts: dict[str, list[Any]] = {
        "id": list(range(k0, k0 + n_carts)),
        "customer_id": (cart_cust + c0).tolist(),
        "created_at": _timestamps(now, cart_age),
        "updated_at": _timestamps(now, cart_idle),
    }
    cart_items: dict[str, list[Any]] = {
        "id": list(range(i0, i0 + len(item_cart))),
        "cart_id": (item_cart + k0).tolist(),
        "product_id": (item_product + ids["products"]).tolist(),
        "quantity": qty.tolist(),
        "unit_price": _money(unit_cents),
    }
    orders: dict[str, list[Any]] = {
        "id": list(range(o0, o0 + len(order_cust))),
        "customer_id": (order_cust + c0).tolist(),
        "cart_id": [None if c < 0 else c + k0 for c in order_cart.tolist()],
        "status": status,
        "total": _money(order_total),
        "created_at": _timestamps(now, order_age),
        "updated_at": _timestamps(now, order_updated_age),
    }
    history = _status_history(
        order_ids=orders["id"],
        status=status,
        created_age=order_age,
        updated_age=order_updated_age,
        now=now,
        id0=ids["order_status_history"],
    )
    return _Shop(customers, prod.cols, carts, cart_items, orders, candidates, history)


def _status_history(
    *,
    order_ids: list[int],
    status: list[str],
    created_age: np.ndarray,
    updated_age: np.ndarray,
    now: datetime,
    id0: int,
) -> dict[str, list[Any]]:
    """Each order's status changes, ending in its current status at ``updated_at``.

    ``placed`` at creation; a delivered order was shipped halfway between creation and
    delivery. No random draws: the history follows from the orders.
    """
    rows: list[tuple[int, str, int]] = []
    for order_id, st, created, updated in zip(
        order_ids, status, created_age.tolist(), updated_age.tolist(), strict=True
    ):
        rows.append((order_id, "placed", created))
        if st == "delivered":
            rows.append((order_id, "shipped", created - (created - updated) // 2))
        if st != "placed":
            rows.append((order_id, st, updated))
    ages = np.array([r[2] for r in rows], dtype=np.int64)
    return {
        "id": list(range(id0, id0 + len(rows))),
        "order_id": [r[0] for r in rows],
        "status": [r[1] for r in rows],
        "changed_at": _timestamps(now, ages),
    }


# --- writing ----------------------------------------------------------------------------------

# Children before parents, so deletes never trip a foreign key.
_SHOP_TABLES: tuple[Table, ...] = (
    schema.order_status_history,
    schema.cart_items,
    schema.orders,
    schema.carts,
    schema.products,
    schema.customers,
)


def _rows(cols: dict[str, list[Any]], start: int, stop: int) -> list[dict[str, Any]]:
    names = list(cols)
    return [
        dict(zip(names, values, strict=True))
        for values in zip(*(cols[c][start:stop] for c in names), strict=True)
    ]


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _insert(conn: Connection, table: Table, cols: dict[str, list[Any]]) -> int:
    n = len(cols["id"])
    for start, stop in _chunks(n, _CHUNK_ROWS):
        conn.execute(insert(table), _rows(cols, start, stop))
    return n


def _next_ids(conn: Connection) -> dict[str, int]:
    """The first free id per shop table (1 on an empty table)."""
    return {
        t.name: int(conn.execute(select(func.coalesce(func.max(t.c.id), 0))).scalar_one()) + 1
        for t in _SHOP_TABLES
    }


def _sync_sequences(conn: Connection) -> None:
    # Explicit ids do not advance PostgreSQL's serial sequences; move them past the rows we
    # wrote so a later insert without an id does not collide.
    if conn.dialect.name != "postgresql":
        return
    for t in _SHOP_TABLES:
        conn.execute(
            text(
                "SELECT setval(pg_get_serial_sequence(:table, 'id'), "
                f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {t.name}), false)"
            ),
            {"table": t.name},
        )


def _default_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)


def seed_shop(
    engine: Engine,
    *,
    customers: int,
    seed: int = 42,
    now: datetime | None = None,
    profile: SeedProfile = DEFAULT_PROFILE,
    replace: bool = True,
) -> SeedStats:
    """Fill the shop tables with a synthetic, deterministic shop.

    Args:
        engine: a warehouse whose tables already exist (migrations or ``create_all``).
        customers: how many customers to create (>= 0).
        seed: the random seed; the same ``(customers, seed, now, profile)`` on an empty
            warehouse writes identical rows.
        now: the reference time, naive UTC (an aware datetime is converted to UTC);
            defaults to the current UTC time truncated to the minute.
        profile: the rates to follow, e.g. ``DEFAULT_PROFILE`` or ``BENCH_PROFILE``.
        replace: delete every row of customers, products, carts, cart_items, orders and
            order_status_history first (mailflow's ``mf_`` tables are left alone). With
            ``False`` a whole new shop, catalogue included, is appended after the highest
            existing ids.

    Returns:
        Rows written per table, the abandoned-cart candidates among them and the time.

    Raises:
        ValueError: ``customers`` is negative.
    """
    if customers < 0:
        raise ValueError(f"customers={customers!r}: must be 0 or more")
    started = time.perf_counter()
    if now is None:
        now = _default_now()
    elif now.tzinfo is not None:
        now = now.astimezone(UTC).replace(tzinfo=None)
    rng = np.random.default_rng(seed)

    with engine.begin() as conn:
        # Generate before deleting, so a SQLite writer lock is held for the writes only.
        ids = {t.name: 1 for t in _SHOP_TABLES} if replace else _next_ids(conn)
        shop = _generate(rng, profile, customers, now, ids)
        generated = time.perf_counter()
        if replace:
            for table in _SHOP_TABLES:
                conn.execute(delete(table))
        counts = {
            "customers": _insert(conn, schema.customers, shop.customers),
            "products": _insert(conn, schema.products, shop.products),
            "carts": _insert(conn, schema.carts, shop.carts),
            "cart_items": _insert(conn, schema.cart_items, shop.cart_items),
            "orders": _insert(conn, schema.orders, shop.orders),
            "order_status_history": _insert(
                conn, schema.order_status_history, shop.order_status_history
            ),
        }
        _sync_sequences(conn)
    seconds = time.perf_counter() - started
    stats = SeedStats(
        **counts, abandoned_candidates=shop.abandoned_candidates, seconds=round(seconds, 3)
    )
    log.info(
        "seeded shop: %s customers, %s products, %s carts, %s items, %s orders, "
        "%s abandoned-cart candidates in %.1f s (generate %.1f s)",
        stats.customers,
        stats.products,
        stats.carts,
        stats.cart_items,
        stats.orders,
        stats.abandoned_candidates,
        seconds,
        generated - started,
    )
    return stats
