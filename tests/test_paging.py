"""One page-size parser (gateway/paging.py) behind the v1 and the TES list endpoints, each API
answering in its own words."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway import paging
from gateway.app import create_app
from gateway.tes import api as tes_api


@pytest.mark.parametrize("raw, expected", [(None, 5), ("", 5), ("1", 1), ("10", 10), ("007", 7)])
def test_whole_numbers(raw: str | None, expected: int) -> None:
    assert paging.whole_number(raw, "n", 5, 1, 10) == expected


@pytest.mark.parametrize("raw", ["0", "11", "-1", "+3", " 3", "3.0", "1e2", "x", "²", "٣", "9" * 5000])
def test_not_whole_numbers_in_range(raw: str) -> None:
    with pytest.raises(paging.OutOfRange) as caught:
        paging.whole_number(raw, "n", 5, 1, 10)
    assert str(caught.value) == f"n: must be a whole number from 1 to 10, not {raw!r}"
    assert caught.value.rule == "must be a whole number from 1 to 10"


def test_page_size() -> None:
    assert paging.page_size(None, 256, 2047) == 256 and paging.page_size("2047", 256, 2047) == 2047
    with pytest.raises(paging.OutOfRange, match=r"^page_size: must be a whole number from 1 to 2047, not '2048'$"):
        paging.page_size("2048", 256, 2047)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    document = {"gateway": {"state_dir": str(tmp_path / "state"), "page_size": 2, "max_page_size": 50}}
    return await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "t")))


async def test_v1_answers_in_its_words(client: Any) -> None:
    response = await client.get("/v1/jobproxy/state?page_size=51")
    body = await response.json()
    assert response.status == 400 and body == {
        "error": "page_size: must be a whole number from 1 to 50, not '51'",
        "details": [{"path": "page_size", "message": "must be a whole number from 1 to 50"}]}
    response = await client.get("/v1/jobproxy/state?page_token=%C2%B2")  # '²' is a digit to str.isdigit
    assert response.status == 400 and (await response.json())["details"][0]["path"] == "page_token"
    response = await client.get("/v1/jobproxy/state?page_size=50")
    assert response.status == 200


async def test_tes_answers_in_its_words(client: Any) -> None:
    response = await client.get("/ga4gh/tes/v1/tasks?page_size=" + "9" * 5000)
    body = await response.json()
    assert response.status == 400
    assert body["error"] == f"page_size: must be a whole number from 1 to {tes_api.MAX_PAGE_SIZE}, not {'9' * 5000!r}"
    assert body["details"] == [{"path": "page_size", "message": body["error"].removeprefix("page_size: ")}]
    response = await client.get(f"/ga4gh/tes/v1/tasks?page_size={tes_api.MAX_PAGE_SIZE}")
    assert response.status == 200
