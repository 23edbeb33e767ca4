"""Solvers for the e-commerce worlds' task templates (carts and wishlists)."""

from __future__ import annotations

from echo_jax.awm.solvers.calls import Call, Choices, Solver, change_match

CART = Call("list_cart_items", {})


def _add_offer_to_cart(offer_id: int, quantity: int) -> Solver:
    yield Call("get_or_create_active_cart", {})
    yield Call(
        "add_item_to_cart",
        {"product_offer_id": offer_id, "quantity": quantity},
        writes=True,
        id_arg="product_offer_id",
        int_arg="quantity",
    )
    yield CART


def solve_cart_top_rated_under_budget(p: dict, ctx: Choices) -> Solver:
    found = yield Call(
        "search_products", {"query": p["query"], "sort_by": "average_rating", "limit": 5}
    )
    ranked = sorted(
        found["products"],
        key=lambda h: (
            -h["aggregates"]["average_rating"],
            -h["aggregates"]["review_count"],
            h["product"]["id"],
        ),
    )
    want, picks = ctx.rank(), []
    for hit in ranked:
        lowest = hit["lowest_active_offer"]
        if lowest is None or lowest["price"] >= p["budget"]:
            continue
        listed = yield Call(
            "list_product_offers", {"product_id": hit["product"]["id"]}, id_arg="product_id"
        )
        valid = [
            o
            for o in listed["offers"]
            if o["is_active"]
            and o["price"] < p["budget"]
            and o["in_stock_quantity"] >= p["quantity"]
        ]
        if valid:
            picks.append(min(valid, key=lambda o: (o["price"], o["id"])))
            if len(picks) > want:
                break
    if picks:
        yield from _add_offer_to_cart(
            picks[min(want, len(picks) - 1)]["id"], ctx.quantity(p["quantity"])
        )


def solve_cart_cheapest_in_stock(p: dict, ctx: Choices) -> Solver:
    found = yield Call("search_products", {"query": p["query"], "sort_by": "price_asc", "limit": 5})
    listed = [h for h in found["products"] if h["lowest_active_offer"]]
    listed.sort(key=lambda h: h["lowest_active_offer"]["price"])
    need, pool = ctx.rank() + 1, []
    for hit in listed:
        if len(pool) >= need and hit["lowest_active_offer"]["price"] >= pool[need - 1]["price"]:
            break
        offers = yield Call(
            "list_product_offers", {"product_id": hit["product"]["id"]}, id_arg="product_id"
        )
        pool += [
            o
            for o in offers["offers"]
            if o["is_active"] and o["in_stock_quantity"] >= p["quantity"]
        ]
        pool.sort(key=lambda o: (o["price"], o["id"]))
    if pool:
        offer = pool[min(need - 1, len(pool) - 1)]
        yield from _add_offer_to_cart(offer["id"], ctx.quantity(p["quantity"]))


def solve_cart_update_quantity(p: dict, ctx: Choices) -> Solver:
    def update(line: dict) -> Call:
        quantity = ctx.quantity(p["quantity"])
        arguments = {"cart_item_id": line["id"], "quantity": quantity}
        return Call(
            "update_cart_item_quantity",
            arguments,
            writes=True,
            id_arg="cart_item_id",
            int_arg="quantity",
        )

    yield from change_match(CART, "items", lambda i: i["product_title"] == p["title"], update, ctx)


def solve_cart_remove_item(p: dict, ctx: Choices) -> Solver:
    def remove(line: dict) -> Call:
        arguments = {"cart_item_id": line["id"]}
        return Call("remove_cart_item", arguments, writes=True, id_arg="cart_item_id")

    yield from change_match(CART, "items", lambda i: i["product_title"] == p["title"], remove, ctx)


def solve_wishlist_best_seller(p: dict, ctx: Choices) -> Solver:
    found = yield Call(
        "search_products", {"query": p["query"], "sort_by": "sales_rank", "limit": 5}
    )
    ranked = sorted(found["products"], key=lambda h: h["aggregates"]["sales_rank"])
    if not ranked:
        return
    product_id = ctx.pick(ranked)["product"]["id"]
    lists = yield Call("list_user_wishlists", {})
    wishlist = next(
        (w for w in lists["wishlists"] if w["name"].lower() == p["wishlist"].lower()), None
    )
    if wishlist is None:
        return
    yield Call(
        "add_item_to_wishlist",
        {"wishlist_id": wishlist["id"], "product_id": product_id},
        writes=True,
        id_arg="product_id",
    )
    yield Call("list_wishlist_items", {"wishlist_id": wishlist["id"]})


SOLVERS = {
    "cart_top_rated_under_budget": solve_cart_top_rated_under_budget,
    "cart_cheapest_in_stock": solve_cart_cheapest_in_stock,
    "cart_update_quantity": solve_cart_update_quantity,
    "cart_remove_item": solve_cart_remove_item,
    "wishlist_best_seller": solve_wishlist_best_seller,
}
