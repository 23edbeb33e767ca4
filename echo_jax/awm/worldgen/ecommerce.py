"""E-commerce worlds: tool names and JSON shapes follow the captured AWM `e_commerce_33` episode.

Each scenario draws its own catalogue (product lines, brands, prices, stock, ratings, sales ranks),
a pre-filled cart and wishlists, then derives tasks whose answers can only be found by reading
search results and offer lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from .common import CLOCK_TABLE, ScenarioData, Table, Task, clock_rows, pick, sample, stamp

PREFIX = "e_commerce"
SERVER_FILE = "ecommerce.py"
USER_ID = 1


@dataclass(frozen=True)
class ProductLine:
    category: str
    parent: str
    query: str
    suffix: str
    brands: tuple[str, ...]
    price_range: tuple[int, int]


PRODUCT_LINES = (
    ProductLine(
        "Headphones",
        "Electronics",
        "wireless noise cancelling headphones",
        "Wireless Noise Cancelling Headphones",
        ("Sony", "Bose", "Anker", "JBL", "Sennheiser", "SoundMax", "Jabra"),
        (60, 380),
    ),
    ProductLine(
        "Earbuds",
        "Electronics",
        "true wireless earbuds",
        "True Wireless Earbuds",
        ("Samsung", "Jabra", "Anker", "Skullcandy", "Beats", "Soundcore"),
        (25, 250),
    ),
    ProductLine(
        "Coffee Makers",
        "Home & Kitchen",
        "programmable drip coffee maker",
        "Programmable Drip Coffee Maker",
        ("Cuisinart", "Mr. Coffee", "Hamilton Beach", "Breville", "Ninja", "Bonavita"),
        (30, 220),
    ),
    ProductLine(
        "Blenders",
        "Home & Kitchen",
        "high speed countertop blender",
        "High Speed Countertop Blender",
        ("Vitamix", "Ninja", "Blendtec", "Oster", "KitchenAid", "Cleanblend"),
        (40, 450),
    ),
    ProductLine(
        "Running Shoes",
        "Sports & Outdoors",
        "lightweight road running shoes",
        "Lightweight Road Running Shoes",
        ("Nike", "Brooks", "Asics", "Hoka", "Saucony", "New Balance"),
        (60, 200),
    ),
    ProductLine(
        "Yoga Mats",
        "Sports & Outdoors",
        "non slip yoga mat",
        "Non Slip Yoga Mat",
        ("Manduka", "Gaiam", "Liforme", "JadeYoga", "Lululemon", "Heathyoga"),
        (18, 140),
    ),
    ProductLine(
        "Backpacks",
        "Office",
        "waterproof laptop backpack",
        "Waterproof Laptop Backpack",
        ("Osprey", "Samsonite", "Tumi", "Targus", "Herschel", "Matein"),
        (25, 260),
    ),
    ProductLine(
        "Desk Lamps",
        "Office",
        "dimmable led desk lamp",
        "Dimmable LED Desk Lamp",
        ("BenQ", "TaoTronics", "Lepower", "Philips", "Dott", "Lumiy"),
        (20, 180),
    ),
    ProductLine(
        "Speakers",
        "Electronics",
        "portable bluetooth speaker",
        "Portable Bluetooth Speaker",
        ("JBL", "Bose", "Ultimate Ears", "Anker", "Marshall", "Tribit"),
        (30, 300),
    ),
    ProductLine(
        "Keyboards",
        "Electronics",
        "mechanical gaming keyboard",
        "Mechanical Gaming Keyboard",
        ("Logitech", "Razer", "Corsair", "Keychron", "SteelSeries", "HyperX"),
        (45, 230),
    ),
)
MODEL_WORDS = (
    "Pulse",
    "Aero",
    "Nova",
    "Flex",
    "Core",
    "Prime",
    "Edge",
    "Wave",
    "Pro",
    "Lite",
    "Max",
    "Air",
    "Zen",
    "Volt",
    "Echo",
    "Quest",
    "Vibe",
    "Arc",
)
DESCRIPTION_OPENERS = (
    "Premium",
    "Everyday",
    "Compact",
    "Durable",
    "Award-winning",
    "Budget-friendly",
    "Best-selling",
)
SELLERS = ("Marketplace Direct", "TechHub Outlet", "Prime Goods Co.", "ValueMart", "Urban Supply")
WISHLIST_NAMES = ("Birthday Ideas", "Home Office", "Holiday Gifts", "Gym Gear", "Kitchen Upgrade")
REVIEW_TEXTS = (
    ("Great value", "Does exactly what I needed and arrived quickly."),
    ("Solid build", "Feels sturdy and well made. Would buy again."),
    ("Just okay", "Works, but the quality could be better for the price."),
    ("Love it", "Use it every day, no complaints so far."),
    ("Disappointed", "Stopped working properly after a few weeks."),
)
REVIEWERS = ("Alex P.", "Jordan K.", "Sam R.", "Taylor M.", "Casey L.", "Morgan D.")
STOCK_LEVELS = (0, 1, 2, 3, 4, 6, 9, 15, 25, 40, 60, 100)
BUDGETS = (30, 40, 50, 60, 75, 100, 120, 150, 175, 200, 250, 300, 350, 400)

TABLES = (
    Table(
        "users",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, "
        "full_name TEXT NOT NULL, created_at TEXT NOT NULL)",
    ),
    Table(
        "categories",
        "CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
        "parent_id INTEGER REFERENCES categories(id))",
    ),
    Table(
        "sellers",
        "CREATE TABLE sellers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, rating REAL NOT NULL)",
    ),
    Table(
        "products",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, title TEXT NOT NULL, "
        "description TEXT NOT NULL, brand TEXT NOT NULL, "
        "category_id INTEGER NOT NULL REFERENCES categories(id), "
        "is_prime_eligible INTEGER NOT NULL DEFAULT 0, "
        "is_subscription_eligible INTEGER NOT NULL DEFAULT 0, "
        "created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
        ("CREATE INDEX idx_products_category ON products(category_id)",),
    ),
    Table(
        "product_aggregates",
        "CREATE TABLE product_aggregates (product_id INTEGER PRIMARY KEY REFERENCES products(id), "
        "average_rating REAL NOT NULL, review_count INTEGER NOT NULL, "
        "sales_rank INTEGER NOT NULL)",
    ),
    Table(
        "product_offers",
        "CREATE TABLE product_offers (id INTEGER PRIMARY KEY, "
        "product_id INTEGER NOT NULL REFERENCES products(id), "
        "seller_id INTEGER NOT NULL REFERENCES sellers(id), sku TEXT NOT NULL UNIQUE, "
        "price REAL NOT NULL CHECK (price >= 0), currency TEXT NOT NULL DEFAULT 'USD', "
        "in_stock_quantity INTEGER NOT NULL CHECK (in_stock_quantity >= 0), "
        "is_prime_eligible INTEGER NOT NULL DEFAULT 0, is_active INTEGER NOT NULL DEFAULT 1, "
        "created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
        ("CREATE INDEX idx_offers_product ON product_offers(product_id)",),
    ),
    Table(
        "product_reviews",
        "CREATE TABLE product_reviews (id INTEGER PRIMARY KEY, "
        "product_id INTEGER NOT NULL REFERENCES products(id), "
        "rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5), title TEXT NOT NULL, "
        "body TEXT NOT NULL, reviewer_name TEXT NOT NULL, created_at TEXT NOT NULL)",
        ("CREATE INDEX idx_reviews_product ON product_reviews(product_id)",),
    ),
    Table(
        "carts",
        "CREATE TABLE carts (id INTEGER PRIMARY KEY, "
        "user_id INTEGER NOT NULL REFERENCES users(id), "
        "status TEXT NOT NULL CHECK (status IN ('active', 'ordered', 'abandoned')), "
        "created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
        ("CREATE INDEX idx_carts_user ON carts(user_id, status)",),
    ),
    Table(
        "cart_items",
        "CREATE TABLE cart_items (id INTEGER PRIMARY KEY, "
        "cart_id INTEGER NOT NULL REFERENCES carts(id), "
        "product_offer_id INTEGER NOT NULL REFERENCES product_offers(id), "
        "quantity INTEGER NOT NULL CHECK (quantity > 0), created_at TEXT NOT NULL, "
        "updated_at TEXT NOT NULL, UNIQUE (cart_id, product_offer_id))",
    ),
    Table(
        "wishlists",
        "CREATE TABLE wishlists (id INTEGER PRIMARY KEY, "
        "user_id INTEGER NOT NULL REFERENCES users(id), name TEXT NOT NULL, "
        "is_default INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL)",
    ),
    Table(
        "wishlist_items",
        "CREATE TABLE wishlist_items (id INTEGER PRIMARY KEY, "
        "wishlist_id INTEGER NOT NULL REFERENCES wishlists(id), "
        "product_id INTEGER NOT NULL REFERENCES products(id), added_at TEXT NOT NULL, "
        "UNIQUE (wishlist_id, product_id))",
    ),
    CLOCK_TABLE,
)

_CART_STATE = """
def _cart(db_path):
    rows = _query(
        db_path,
        "SELECT ci.product_offer_id, ci.quantity FROM cart_items ci "
        "JOIN carts c ON c.id = ci.cart_id WHERE c.user_id = 1 AND c.status = 'active'",
    )
    cart = {}
    for offer_id, quantity in rows:
        cart[offer_id] = cart.get(offer_id, 0) + quantity
    return cart

"""

VERIFIERS = {
    "cart_add": _CART_STATE
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """Exactly one cart line grew, by the requested quantity, and it is an acceptable offer."""
    try:
        before, after = _cart(initial_db_path), _cart(final_db_path)
    except sqlite3.Error:
        return _result(False)
    changed = [o for o in set(before) | set(after) if before.get(o, 0) != after.get(o, 0)]
    if len(changed) != 1:
        return _result(False)
    offer_id = changed[0]
    added = after.get(offer_id, 0) - before.get(offer_id, 0)
    return _result(offer_id in EXPECTED["offer_ids"] and added == EXPECTED["quantity"])
''',
    "cart_set_line": _CART_STATE
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """The target line has the requested quantity (0 = removed); every other line is untouched."""
    try:
        before, after = _cart(initial_db_path), _cart(final_db_path)
    except sqlite3.Error:
        return _result(False)
    expected = dict(before)
    if EXPECTED["quantity"] > 0:
        expected[EXPECTED["offer_id"]] = EXPECTED["quantity"]
    else:
        expected.pop(EXPECTED["offer_id"], None)
    return _result(EXPECTED["offer_id"] in before and after == expected)
''',
    "wishlist_add": '''
def _saved(db_path):
    rows = _query(
        db_path,
        "SELECT wi.wishlist_id, wi.product_id FROM wishlist_items wi "
        "JOIN wishlists w ON w.id = wi.wishlist_id WHERE w.user_id = 1",
    )
    return {(w, p) for w, p in rows}


def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """The product was saved to the named wishlist and nothing else changed."""
    try:
        before, after = _saved(initial_db_path), _saved(final_db_path)
    except sqlite3.Error:
        return _result(False)
    target = (EXPECTED["wishlist_id"], EXPECTED["product_id"])
    return _result(target not in before and after == before | {target})
''',
}


@dataclass
class _Catalog:
    """Products with their offers and aggregates, indexed the way tasks need them."""

    products: list[dict]
    offers: list[dict]
    aggregates: dict[int, dict]

    def matching(self, query: str) -> list[dict]:
        """Products the server's search returns for a query (same token rule as the server)."""
        tokens = query.lower().split()
        return [
            p
            for p in self.products
            if all(t in f"{p['title']} {p['description']} {p['brand']}".lower() for t in tokens)
        ]

    def active_offers(self, product_id: int) -> list[dict]:
        offers = [o for o in self.offers if o["product_id"] == product_id and o["is_active"]]
        return sorted(offers, key=lambda o: (o["price"], o["id"]))

    def by_rating(self, products: list[dict]) -> list[dict]:
        def key(p: dict) -> tuple:
            agg = self.aggregates[p["id"]]
            return (-agg["average_rating"], -agg["review_count"], p["id"])

        return sorted(products, key=key)


def _build_catalog(rng: np.random.Generator, lines: list[ProductLine], base: datetime) -> tuple:
    parents = sorted({line.parent for line in lines})
    categories = [{"id": i + 1, "name": name, "parent_id": None} for i, name in enumerate(parents)]
    parent_ids = {c["name"]: c["id"] for c in categories}
    products: list[dict] = []
    offers: list[dict] = []
    aggregates: dict[int, dict] = {}
    titles: set[str] = set()
    max_products = 5 * len(lines)
    ranks = (rng.permutation(max_products) + 1) * 10 + rng.integers(0, 10, size=max_products)
    for line in lines:
        category_id = len(categories) + 1
        categories.append(
            {"id": category_id, "name": line.category, "parent_id": parent_ids[line.parent]}
        )
        for brand in sample(rng, line.brands, int(rng.integers(4, 6))):
            model = (
                f"{pick(rng, MODEL_WORDS)} {int(rng.integers(2, 10))}{pick(rng, ('', '0', '00'))}"
            )
            title = f"{brand} {model} {line.suffix}"
            if title in titles:
                continue
            titles.add(title)
            pid = len(products) + 1
            created = stamp(base, rng, 120)
            products.append(
                {
                    "id": pid,
                    "title": title,
                    "description": f"{pick(rng, DESCRIPTION_OPENERS)} {line.query} from {brand}.",
                    "brand": brand,
                    "category_id": category_id,
                    "is_prime_eligible": bool(rng.random() < 0.6),
                    "is_subscription_eligible": False,
                    "created_at": created,
                    "updated_at": stamp(base, rng, 200),
                }
            )
            aggregates[pid] = {
                "product_id": pid,
                "average_rating": round(float(rng.integers(30, 50)) / 10, 1),
                "review_count": int(rng.integers(12, 9000)),
                "sales_rank": int(ranks[pid - 1]),
            }
            list_price = float(rng.integers(*line.price_range))
            for seller_idx in sample(rng, range(len(SELLERS)), int(rng.integers(1, 4))):
                oid = len(offers) + 1
                price = round(max(5.0, list_price * float(rng.uniform(0.85, 1.15))), 0) - 0.01
                offers.append(
                    {
                        "id": oid,
                        "product_id": pid,
                        "seller_id": seller_idx + 1,
                        "sku": f"{brand[:4].upper().replace(' ', '')}-{pid:03d}-{oid:03d}",
                        "price": round(price, 2),
                        "currency": "USD",
                        "in_stock_quantity": int(pick(rng, STOCK_LEVELS)),
                        "is_prime_eligible": bool(rng.random() < 0.5),
                        "is_active": bool(rng.random() < 0.9),
                        "created_at": created,
                        "updated_at": stamp(base, rng, 200),
                    }
                )
    return categories, _Catalog(products, offers, aggregates)


def _top_rated_task(rng, catalog: _Catalog, line: ProductLine) -> Task | None:
    """Capture-style task: top-rated product whose offer fits a budget, reached via its offers."""
    ranked = catalog.by_rating(catalog.matching(line.query))
    quantity = int(pick(rng, (1, 1, 2, 3)))

    def fits(product: dict, budget: int) -> list[dict]:
        return [
            o
            for o in catalog.active_offers(product["id"])
            if o["price"] < budget and o["in_stock_quantity"] >= quantity
        ]

    preferred, usable = [], []
    for budget in BUDGETS:
        fitting = [p for p in ranked if fits(p, budget)]
        affordable = [
            p for p in ranked if any(o["price"] < budget for o in catalog.active_offers(p["id"]))
        ]
        if len(fitting) >= 2:
            usable.append(budget)
            if fitting[0] is affordable[0] and fitting[0] is not ranked[0]:
                preferred.append(budget)
    if not usable:
        return None
    budget = pick(rng, preferred or usable)
    target = next(p for p in ranked if fits(p, budget))
    return Task(
        text=(
            f"Search for '{line.query}', sort results by average customer rating, and add the "
            f"top-rated item under ${budget} to my cart in quantity {quantity}."
        ),
        template="cart_top_rated_under_budget",
        params={"query": line.query, "budget": budget, "quantity": quantity},
        expected={"offer_ids": [o["id"] for o in fits(target, budget)], "quantity": quantity},
    )


def _cheapest_in_stock_task(rng, catalog: _Catalog, line: ProductLine) -> Task | None:
    """Cheapest offer with enough stock: the cheapest listing is often sold out, so read offers."""
    matches = catalog.matching(line.query)
    options = []
    for quantity in (2, 3, 4):
        valid = [
            o
            for p in matches
            for o in catalog.active_offers(p["id"])
            if o["in_stock_quantity"] >= quantity
        ]
        prices = sorted({o["price"] for o in valid})
        if len(prices) < 2:
            continue
        cheapest_any = min(o["price"] for p in matches for o in catalog.active_offers(p["id"]))
        options.append(
            (
                prices[0] > cheapest_any,
                quantity,
                [o["id"] for o in valid if o["price"] == prices[0]],
            )
        )
    if not options:
        return None
    trapped = [o for o in options if o[0]]
    _, quantity, offer_ids = pick(rng, trapped or options)
    return Task(
        text=(
            f"Find the cheapest active offer for '{line.query}' that has at least {quantity} units "
            f"in stock, from any seller, and add {quantity} units of it to my cart."
        ),
        template="cart_cheapest_in_stock",
        params={"query": line.query, "quantity": quantity},
        expected={"offer_ids": offer_ids, "quantity": quantity},
    )


def _best_seller_task(rng, catalog: _Catalog, line: ProductLine, wishlists, saved) -> Task | None:
    ranked = sorted(
        catalog.matching(line.query), key=lambda p: catalog.aggregates[p["id"]]["sales_rank"]
    )
    if len(ranked) < 2:
        return None
    target = ranked[0]
    free = [w for w in wishlists if (w["id"], target["id"]) not in saved]
    wishlist = pick(rng, free)
    return Task(
        text=(
            f"Add the best-selling '{line.query}' (the one with the lowest sales rank) to my "
            f"wishlist named '{wishlist['name']}'."
        ),
        template="wishlist_best_seller",
        params={"query": line.query, "wishlist": wishlist["name"]},
        expected={"wishlist_id": wishlist["id"], "product_id": target["id"]},
    )


def build(name: str, rng: np.random.Generator) -> ScenarioData:
    """One e-commerce scenario: its catalogue, cart, wishlists and ten tasks."""
    base = datetime(2025, 8, 1, 9, 0, 0)
    lines = sample(rng, PRODUCT_LINES, 7)
    categories, catalog = _build_catalog(rng, lines, base)
    users = [
        {
            "id": 1,
            "email": "shopper@example.com",
            "full_name": "Riley Shopper",
            "created_at": stamp(base, rng, 30),
        },
        {
            "id": 2,
            "email": "dana.w@example.com",
            "full_name": "Dana Whitfield",
            "created_at": stamp(base, rng, 30),
        },
    ]
    sellers = [
        {"id": i + 1, "name": s, "rating": round(float(rng.integers(38, 50)) / 10, 1)}
        for i, s in enumerate(SELLERS)
    ]
    reviews = []
    for product in catalog.products:
        for _ in range(int(rng.integers(0, 2))):
            title, body = pick(rng, REVIEW_TEXTS)
            reviews.append(
                {
                    "id": len(reviews) + 1,
                    "product_id": product["id"],
                    "rating": int(rng.integers(2, 6)),
                    "title": title,
                    "body": body,
                    "reviewer_name": pick(rng, REVIEWERS),
                    "created_at": stamp(base, rng, 300),
                }
            )

    task_lines = lines[:4]
    task_products = {p["id"] for line in task_lines for p in catalog.matching(line.query)}
    stocked = {
        o["product_id"]: o
        for o in catalog.offers
        if o["is_active"] and o["in_stock_quantity"] >= 6 and o["product_id"] not in task_products
    }
    if len(stocked) < 2:
        raise ValueError("not enough stocked products outside the task lines for a cart")
    cart_offers = sample(rng, sorted(stocked.values(), key=lambda o: o["id"]), 3)
    cart_stamp = stamp(base, rng, 300)
    carts = [
        {
            "id": 1,
            "user_id": 2,
            "status": "active",
            "created_at": cart_stamp,
            "updated_at": cart_stamp,
        },
        {
            "id": 2,
            "user_id": USER_ID,
            "status": "active",
            "created_at": cart_stamp,
            "updated_at": cart_stamp,
        },
    ]
    cart_items = [
        {
            "id": 1,
            "cart_id": 1,
            "product_offer_id": catalog.offers[0]["id"],
            "quantity": 1,
            "created_at": cart_stamp,
            "updated_at": cart_stamp,
        },
    ]
    for offer in cart_offers:
        cart_items.append(
            {
                "id": len(cart_items) + 1,
                "cart_id": 2,
                "product_offer_id": offer["id"],
                "quantity": int(rng.integers(1, 3)),
                "created_at": cart_stamp,
                "updated_at": cart_stamp,
            }
        )

    wishlists = [
        {
            "id": i + 1,
            "user_id": USER_ID,
            "name": n,
            "is_default": i == 0,
            "created_at": stamp(base, rng, 200),
        }
        for i, n in enumerate(sample(rng, WISHLIST_NAMES, 3))
    ]
    wishlist_items = []
    for wishlist in wishlists:
        for product in sample(rng, catalog.products, int(rng.integers(1, 4))):
            wishlist_items.append(
                {
                    "id": len(wishlist_items) + 1,
                    "wishlist_id": wishlist["id"],
                    "product_id": product["id"],
                    "added_at": stamp(base, rng, 300),
                }
            )
    saved = {(w["wishlist_id"], w["product_id"]) for w in wishlist_items}

    titles = {p["id"]: p["title"] for p in catalog.products}
    offer_product = {o["id"]: o["product_id"] for o in catalog.offers}
    my_items = [i for i in cart_items if i["cart_id"] == 2]
    line_tasks: list[list[Task]] = []
    for maker, pool in (
        (_top_rated_task, task_lines),
        (_cheapest_in_stock_task, task_lines[::-1]),
    ):
        line_tasks.append([t for line in pool if (t := maker(rng, catalog, line))][:2])
    line_tasks.append(
        [
            t
            for line in sample(rng, lines, len(lines))
            if (t := _best_seller_task(rng, catalog, line, wishlists, saved))
        ][:2]
    )
    cart_tasks: list[list[Task]] = [[], []]
    shuffled = sample(rng, my_items, len(my_items))
    for k, item in enumerate(shuffled):
        title = titles[offer_product[item["product_offer_id"]]]
        new_quantity = pick(rng, [q for q in range(1, 6) if q != item["quantity"]])
        cart_tasks[0].append(
            Task(
                text=f"Change the quantity of '{title}' in my cart to {new_quantity}.",
                template="cart_update_quantity",
                params={"title": title, "quantity": new_quantity},
                expected={"offer_id": item["product_offer_id"], "quantity": new_quantity},
            )
        )
        removal = shuffled[(k + 1) % len(shuffled)]
        cart_tasks[1].append(
            Task(
                text=(
                    f"Remove '{titles[offer_product[removal['product_offer_id']]]}' from my cart "
                    "and leave the other items as they are."
                ),
                template="cart_remove_item",
                params={"title": titles[offer_product[removal["product_offer_id"]]]},
                expected={"offer_id": removal["product_offer_id"], "quantity": 0},
            )
        )
    groups = line_tasks[:2] + [cart_tasks[0][:2], cart_tasks[1][:2], line_tasks[2]]
    if any(len(group) < 2 for group in groups):
        raise ValueError("scenario draw cannot support every task template twice")
    tasks = [group[i] for i in range(2) for group in groups]
    rows = {
        "users": users,
        "categories": categories,
        "sellers": sellers,
        "products": catalog.products,
        "product_aggregates": list(catalog.aggregates.values()),
        "product_offers": catalog.offers,
        "product_reviews": reviews,
        "carts": carts,
        "cart_items": cart_items,
        "wishlists": wishlists,
        "wishlist_items": wishlist_items,
        # A day past the latest possible stamp(base, rng, 300): after every row's timestamps.
        "world_clock": clock_rows(base + timedelta(days=301)),
    }
    brands = sorted({p["brand"] for p in catalog.products})[:4]
    description = (
        "An online marketplace where a signed-in shopper searches a catalogue of "
        f"{', '.join(line.category.lower() for line in lines)}, compares seller offers by price, "
        f"stock and rating (brands such as {', '.join(brands)}), and manages a shopping cart and "
        "wishlists."
    )
    return ScenarioData(name=name, description=description, rows=rows, tasks=tasks)


TEMPLATE_VERIFIER = {
    "cart_top_rated_under_budget": "cart_add",
    "cart_cheapest_in_stock": "cart_add",
    "cart_update_quantity": "cart_set_line",
    "cart_remove_item": "cart_set_line",
    "wishlist_best_seller": "wishlist_add",
}
