"""Tests for endpoints/schemas.py: a JSON body's values keep their JSON type, in a list too."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError, create_model, model_validator

from endpoints.schemas import json_scalars_only


class Numbers(BaseModel):
    ids: list[int] = []
    maybe: list[int | None] = []


_VALIDATORS: dict[str, Any] = {"_only": model_validator(mode="before")(json_scalars_only)}
#: as endpoints/tasks.py makes a JSON route's request model
JsonNumbers: type[BaseModel] = create_model("JsonNumbers", __base__=Numbers, __validators__=_VALIDATORS)


def test_the_items_of_a_list_of_scalars_keep_their_json_type() -> None:
    assert JsonNumbers.model_validate({"ids": [1, 2]}).model_dump()["ids"] == [1, 2]
    # a null item is left to the item type: taken where it allows one
    assert JsonNumbers.model_validate({"maybe": [1, None]}).model_dump()["maybe"] == [1, None]


@pytest.mark.parametrize(("body", "where"), [
    ({"ids": [1, True]}, ("ids", 1)),
    ({"ids": ["2"]}, ("ids", 0)),
    ({"maybe": [None, "3"]}, ("maybe", 1)),
    ({"ids": [None]}, ("ids", 0)),
])
def test_an_item_of_another_json_type_is_refused_naming_it(
    body: dict[str, Any], where: tuple[str, int]
) -> None:
    with pytest.raises(ValidationError) as refused:
        JsonNumbers.model_validate(body)
    assert [error["loc"] for error in refused.value.errors()] == [where]
