"""E-commerce marketplace API: catalogue search, seller offers, the shopper's cart and wishlists.

Every route's operation_id is the MCP tool name an agent calls; the signed-in shopper is user 1.
"""

import os
from typing import Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text

DATABASE_URL = os.environ.get("DATABASE_PATH", "sqlite:///./e_commerce.db")
CURRENT_USER_ID = 1

engine = create_engine(DATABASE_URL, connect_args={"check_same_thread": False})
app = FastAPI(title="E-commerce Marketplace API", version="1.0.0")


def now_iso() -> str:
    """The world's current time from its one-row world_clock table, never the wall clock, so the
    same calls against a fresh copy of the database always give the same results."""
    return fetch_one("SELECT now FROM world_clock WHERE id = 1")["now"]


def fetch_all(sql: str, **params) -> list[dict]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(sql), params).mappings()]


def fetch_one(sql: str, **params) -> dict | None:
    rows = fetch_all(sql, **params)
    return rows[0] if rows else None


def product_out(row: dict) -> dict:
    return {
        "id": row["id"],
        "title": row["title"],
        "description": row["description"],
        "brand": row["brand"],
        "category_id": row["category_id"],
        "is_prime_eligible": bool(row["is_prime_eligible"]),
        "is_subscription_eligible": bool(row["is_subscription_eligible"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def offer_out(row: dict) -> dict:
    return {
        "id": row["id"],
        "product_id": row["product_id"],
        "seller_id": row["seller_id"],
        "sku": row["sku"],
        "price": row["price"],
        "currency": row["currency"],
        "in_stock_quantity": row["in_stock_quantity"],
        "is_prime_eligible": bool(row["is_prime_eligible"]),
        "is_active": bool(row["is_active"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def aggregates_out(product_id: int) -> dict | None:
    return fetch_one(
        "SELECT product_id, average_rating, review_count, sales_rank FROM product_aggregates "
        "WHERE product_id = :pid",
        pid=product_id,
    )


def lowest_active_offer(product_id: int) -> dict | None:
    row = fetch_one(
        "SELECT * FROM product_offers WHERE product_id = :pid AND is_active = 1 "
        "ORDER BY price ASC, id ASC LIMIT 1",
        pid=product_id,
    )
    return offer_out(row) if row else None


def require_product(product_id: int) -> dict:
    row = fetch_one("SELECT * FROM products WHERE id = :pid", pid=product_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"Product {product_id} not found")
    return row


def active_cart() -> dict | None:
    return fetch_one(
        "SELECT * FROM carts WHERE user_id = :uid AND status = 'active' ORDER BY id LIMIT 1",
        uid=CURRENT_USER_ID,
    )


def cart_item_in_active_cart(cart_item_id: int) -> dict:
    cart = active_cart()
    row = None
    if cart is not None:
        row = fetch_one(
            "SELECT * FROM cart_items WHERE id = :iid AND cart_id = :cid",
            iid=cart_item_id,
            cid=cart["id"],
        )
    if row is None:
        raise HTTPException(
            status_code=404, detail=f"Cart item {cart_item_id} not found in active cart"
        )
    return row


def require_wishlist(wishlist_id: int) -> dict:
    row = fetch_one(
        "SELECT * FROM wishlists WHERE id = :wid AND user_id = :uid",
        wid=wishlist_id,
        uid=CURRENT_USER_ID,
    )
    if row is None:
        raise HTTPException(status_code=404, detail=f"Wishlist {wishlist_id} not found")
    return row


def check_stock(offer: dict, quantity: int) -> None:
    if quantity > offer["in_stock_quantity"]:
        raise HTTPException(
            status_code=409,
            detail=(
                f"Insufficient stock for offer {offer['id']}: requested {quantity}, "
                f"available {offer['in_stock_quantity']}"
            ),
        )


class AddCartItemRequest(BaseModel):
    product_offer_id: int = Field(..., description="ID of the seller offer to buy")
    quantity: int = Field(1, ge=1, le=99, description="Number of units to add")


class UpdateCartItemRequest(BaseModel):
    quantity: int = Field(..., ge=1, le=99, description="New number of units")


class CreateWishlistRequest(BaseModel):
    name: str = Field(..., min_length=1, max_length=80)
    is_default: bool = False


class AddWishlistItemRequest(BaseModel):
    product_id: int = Field(..., description="ID of the product to save")


@app.get(
    "/products/search",
    operation_id="search_products",
    tags=["catalog"],
    summary="Search products",
    response_description="products: [{product, aggregates, lowest_active_offer}], total",
)
def search_products(
    query: str = Query(..., description="Keywords that must all appear in the product"),
    sort_by: Literal["relevance", "average_rating", "price_asc", "price_desc", "sales_rank"] = (
        "relevance"
    ),
    category_id: int | None = Query(None, description="Only products in this category"),
    limit: int = Query(10, ge=1, le=50),
):
    """Keyword search over titles, descriptions and brands with ratings and the cheapest offer."""
    tokens = query.lower().split()
    if not tokens:
        raise HTTPException(status_code=400, detail="query must not be empty")
    rows = fetch_all(
        "SELECT p.*, a.average_rating, a.review_count, a.sales_rank FROM products p "
        "JOIN product_aggregates a ON a.product_id = p.id ORDER BY p.id"
    )
    hits = []
    for row in rows:
        haystack = f"{row['title']} {row['description']} {row['brand']}".lower()
        if category_id is not None and row["category_id"] != category_id:
            continue
        if all(token in haystack for token in tokens):
            hits.append((row, lowest_active_offer(row["id"])))

    def price_key(hit):
        offer = hit[1]
        return offer["price"] if offer else float("inf")

    if sort_by == "average_rating":
        hits.sort(key=lambda h: (-h[0]["average_rating"], -h[0]["review_count"], h[0]["id"]))
    elif sort_by == "price_asc":
        hits.sort(key=lambda h: (price_key(h), h[0]["id"]))
    elif sort_by == "price_desc":
        hits.sort(key=lambda h: (h[1] is None, -price_key(h) if h[1] else 0.0, h[0]["id"]))
    elif sort_by == "sales_rank":
        hits.sort(key=lambda h: (h[0]["sales_rank"], h[0]["id"]))
    products = [
        {
            "product": product_out(row),
            "aggregates": {
                "product_id": row["id"],
                "average_rating": row["average_rating"],
                "review_count": row["review_count"],
                "sales_rank": row["sales_rank"],
            },
            "lowest_active_offer": offer,
        }
        for row, offer in hits[:limit]
    ]
    return {"products": products, "total": len(hits)}


@app.get(
    "/products/{product_id}",
    operation_id="get_product_by_id",
    tags=["catalog"],
    summary="Get product details",
    response_description="product, aggregates, category",
)
def get_product_by_id(product_id: int):
    """Full product record with rating aggregates and its category."""
    row = require_product(product_id)
    category = fetch_one(
        "SELECT id, name, parent_id FROM categories WHERE id = :cid", cid=row["category_id"]
    )
    return {
        "product": product_out(row),
        "aggregates": aggregates_out(product_id),
        "category": category,
    }


@app.get(
    "/categories",
    operation_id="list_product_categories",
    tags=["catalog"],
    summary="List product categories",
    response_description="categories: [{id, name, parent_id}]",
)
def list_product_categories():
    """All catalogue categories."""
    return {"categories": fetch_all("SELECT id, name, parent_id FROM categories ORDER BY id")}


@app.get(
    "/products/{product_id}/offers",
    operation_id="list_product_offers",
    tags=["catalog"],
    summary="List seller offers for a product",
    response_description="offers: [{id, seller_id, sku, price, in_stock_quantity, is_active, ...}]",
)
def list_product_offers(product_id: int, include_inactive: bool = False):
    """Every seller's offer (price, stock) for one product, cheapest first."""
    require_product(product_id)
    sql = "SELECT * FROM product_offers WHERE product_id = :pid"
    if not include_inactive:
        sql += " AND is_active = 1"
    rows = fetch_all(sql + " ORDER BY price ASC, id ASC", pid=product_id)
    return {"offers": [offer_out(r) for r in rows]}


@app.get(
    "/products/{product_id}/reviews",
    operation_id="list_product_reviews",
    tags=["catalog"],
    summary="List product reviews",
    response_description="reviews: [{id, rating, title, body, reviewer_name, created_at}], total",
)
def list_product_reviews(product_id: int, limit: int = Query(5, ge=1, le=20)):
    """Most recent customer reviews of a product."""
    require_product(product_id)
    rows = fetch_all(
        "SELECT id, product_id, rating, title, body, reviewer_name, created_at "
        "FROM product_reviews WHERE product_id = :pid ORDER BY created_at DESC, id DESC",
        pid=product_id,
    )
    return {"reviews": rows[:limit], "total": len(rows)}


@app.post(
    "/cart/active",
    operation_id="get_or_create_active_cart",
    tags=["cart"],
    summary="Get or create the active cart",
    response_description="cart: {id, user_id, status, created_at, updated_at}",
)
def get_or_create_active_cart():
    """Return the shopper's active cart, creating an empty one if there is none."""
    cart = active_cart()
    if cart is None:
        stamp = now_iso()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO carts (user_id, status, created_at, updated_at) "
                    "VALUES (:uid, 'active', :ts, :ts)"
                ),
                {"uid": CURRENT_USER_ID, "ts": stamp},
            )
        cart = active_cart()
    return {"cart": cart}


@app.get(
    "/cart/items",
    operation_id="list_cart_items",
    tags=["cart"],
    summary="List items in the active cart",
    response_description="cart_id, items: [{id, product_offer_id, quantity, product_title, price}]",
)
def list_cart_items():
    """Items in the active cart with their product titles and unit prices."""
    cart = active_cart()
    if cart is None:
        return {"cart_id": None, "items": []}
    rows = fetch_all(
        "SELECT ci.id, ci.product_offer_id, ci.quantity, o.product_id, p.title AS product_title, "
        "o.price, o.currency, o.is_prime_eligible, ci.created_at, ci.updated_at "
        "FROM cart_items ci JOIN product_offers o ON o.id = ci.product_offer_id "
        "JOIN products p ON p.id = o.product_id WHERE ci.cart_id = :cid ORDER BY ci.id",
        cid=cart["id"],
    )
    for row in rows:
        row["is_prime_eligible"] = bool(row["is_prime_eligible"])
    return {"cart_id": cart["id"], "items": rows}


@app.post(
    "/cart/items",
    operation_id="add_item_to_cart",
    tags=["cart"],
    summary="Add an offer to the active cart",
    response_description="cart_item: {id, cart_id, product_offer_id, quantity, ...}",
)
def add_item_to_cart(body: AddCartItemRequest):
    """Add units of a seller offer; adding an offer already in the cart raises its quantity."""
    offer = fetch_one("SELECT * FROM product_offers WHERE id = :oid", oid=body.product_offer_id)
    if offer is None:
        raise HTTPException(
            status_code=404, detail=f"Product offer {body.product_offer_id} not found"
        )
    if not offer["is_active"]:
        raise HTTPException(status_code=400, detail=f"Offer {offer['id']} is not active")
    cart = get_or_create_active_cart()["cart"]
    existing = fetch_one(
        "SELECT * FROM cart_items WHERE cart_id = :cid AND product_offer_id = :oid",
        cid=cart["id"],
        oid=offer["id"],
    )
    new_quantity = body.quantity + (existing["quantity"] if existing else 0)
    check_stock(offer, new_quantity)
    stamp = now_iso()
    with engine.begin() as conn:
        if existing:
            conn.execute(
                text("UPDATE cart_items SET quantity = :q, updated_at = :ts WHERE id = :iid"),
                {"q": new_quantity, "ts": stamp, "iid": existing["id"]},
            )
            item_id = existing["id"]
        else:
            result = conn.execute(
                text(
                    "INSERT INTO cart_items (cart_id, product_offer_id, quantity, created_at, "
                    "updated_at) VALUES (:cid, :oid, :q, :ts, :ts)"
                ),
                {"cid": cart["id"], "oid": offer["id"], "q": new_quantity, "ts": stamp},
            )
            item_id = result.lastrowid
    return {"cart_item": fetch_one("SELECT * FROM cart_items WHERE id = :iid", iid=item_id)}


@app.patch(
    "/cart/items/{cart_item_id}",
    operation_id="update_cart_item_quantity",
    tags=["cart"],
    summary="Change the quantity of a cart item",
    response_description="cart_item: {id, cart_id, product_offer_id, quantity, ...}",
)
def update_cart_item_quantity(cart_item_id: int, body: UpdateCartItemRequest):
    """Set a cart line to an exact number of units (stock permitting)."""
    item = cart_item_in_active_cart(cart_item_id)
    offer = fetch_one("SELECT * FROM product_offers WHERE id = :oid", oid=item["product_offer_id"])
    check_stock(offer, body.quantity)
    stamp = now_iso()
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE cart_items SET quantity = :q, updated_at = :ts WHERE id = :iid"),
            {"q": body.quantity, "ts": stamp, "iid": cart_item_id},
        )
    return {"cart_item": fetch_one("SELECT * FROM cart_items WHERE id = :iid", iid=cart_item_id)}


@app.delete(
    "/cart/items/{cart_item_id}",
    operation_id="remove_cart_item",
    tags=["cart"],
    summary="Remove an item from the active cart",
    response_description="deleted, cart_item_id",
)
def remove_cart_item(cart_item_id: int):
    """Delete one line from the active cart."""
    cart_item_in_active_cart(cart_item_id)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM cart_items WHERE id = :iid"), {"iid": cart_item_id})
    return {"deleted": True, "cart_item_id": cart_item_id}


@app.get(
    "/wishlists",
    operation_id="list_user_wishlists",
    tags=["wishlists"],
    summary="List the shopper's wishlists",
    response_description="wishlists: [{id, name, is_default, item_count, created_at}]",
)
def list_user_wishlists():
    """The shopper's wishlists with how many products each holds."""
    rows = fetch_all(
        "SELECT w.id, w.user_id, w.name, w.is_default, w.created_at, "
        "(SELECT COUNT(*) FROM wishlist_items wi WHERE wi.wishlist_id = w.id) AS item_count "
        "FROM wishlists w WHERE w.user_id = :uid ORDER BY w.id",
        uid=CURRENT_USER_ID,
    )
    for row in rows:
        row["is_default"] = bool(row["is_default"])
    return {"wishlists": rows}


@app.post(
    "/wishlists",
    operation_id="create_user_wishlist",
    tags=["wishlists"],
    summary="Create a wishlist",
    response_description="wishlist: {id, user_id, name, is_default, created_at}",
)
def create_user_wishlist(body: CreateWishlistRequest):
    """Create a new named wishlist for the shopper."""
    name = body.name.strip()
    clash = fetch_one(
        "SELECT id FROM wishlists WHERE user_id = :uid AND lower(name) = lower(:name)",
        uid=CURRENT_USER_ID,
        name=name,
    )
    if clash:
        raise HTTPException(status_code=409, detail=f"A wishlist named '{name}' already exists")
    stamp = now_iso()
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "INSERT INTO wishlists (user_id, name, is_default, created_at) "
                "VALUES (:uid, :name, :d, :ts)"
            ),
            {"uid": CURRENT_USER_ID, "name": name, "d": int(body.is_default), "ts": stamp},
        )
    row = fetch_one("SELECT * FROM wishlists WHERE id = :wid", wid=result.lastrowid)
    row["is_default"] = bool(row["is_default"])
    return {"wishlist": row}


@app.get(
    "/wishlists/{wishlist_id}/items",
    operation_id="list_wishlist_items",
    tags=["wishlists"],
    summary="List products saved in a wishlist",
    response_description="wishlist_id, items: [{id, product_id, product_title, added_at}]",
)
def list_wishlist_items(wishlist_id: int):
    """Products saved in one wishlist."""
    require_wishlist(wishlist_id)
    rows = fetch_all(
        "SELECT wi.id, wi.product_id, p.title AS product_title, wi.added_at FROM wishlist_items wi "
        "JOIN products p ON p.id = wi.product_id WHERE wi.wishlist_id = :wid ORDER BY wi.id",
        wid=wishlist_id,
    )
    return {"wishlist_id": wishlist_id, "items": rows}


@app.post(
    "/wishlists/{wishlist_id}/items",
    operation_id="add_item_to_wishlist",
    tags=["wishlists"],
    summary="Save a product to a wishlist",
    response_description="wishlist_item: {id, wishlist_id, product_id, added_at}",
)
def add_item_to_wishlist(wishlist_id: int, body: AddWishlistItemRequest):
    """Save a product to a wishlist (each product at most once per list)."""
    require_wishlist(wishlist_id)
    require_product(body.product_id)
    if fetch_one(
        "SELECT id FROM wishlist_items WHERE wishlist_id = :wid AND product_id = :pid",
        wid=wishlist_id,
        pid=body.product_id,
    ):
        raise HTTPException(
            status_code=409, detail=f"Product {body.product_id} is already in this wishlist"
        )
    stamp = now_iso()
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "INSERT INTO wishlist_items (wishlist_id, product_id, added_at) "
                "VALUES (:wid, :pid, :ts)"
            ),
            {"wid": wishlist_id, "pid": body.product_id, "ts": stamp},
        )
    item = fetch_one("SELECT * FROM wishlist_items WHERE id = :iid", iid=result.lastrowid)
    return {"wishlist_item": item}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
