"""Tests for carwash_jobs/registry.py: task types, payload validation and the registry."""

from __future__ import annotations

from datetime import timedelta

import pytest

from carwash_jobs.errors import ConfigurationError, InvalidPayload, UnknownTaskType
from carwash_jobs.registry import FROM_SETTINGS, TaskDefaults, TaskOptions, TaskRegistry, TaskType
from tests.carwash_jobs.support import NOOP, ORDER, Item, Order, noop, registry_with


def test_validate_payload_returns_the_typed_model() -> None:
    order = ORDER.validate_payload({"customer_id": 7, "lines": [{"sku": "wax", "qty": 2}]})
    assert isinstance(order, Order)
    assert order.lines[0].qty == 2


def test_validate_payload_passes_an_instance_of_the_model_through() -> None:
    item = Item(label="x")
    assert NOOP.validate_payload(item) is item


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"lines": [{"sku": "wax", "qty": 1}]}, "customer_id"),
        ({"customer_id": "seven", "lines": [{"sku": "wax", "qty": 1}]}, "customer_id"),
        ({"customer_id": 1, "lines": []}, "lines"),
        ({"customer_id": 1, "lines": [{"sku": "wax", "qty": 1}, {"sku": "", "qty": 1}]},
         "lines.1.sku"),
        ({"customer_id": 1, "lines": [{"sku": "wax", "qty": 0}]}, "lines.0.qty"),
    ],
)
def test_an_invalid_payload_is_rejected_naming_the_wrong_field(
    payload: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        ORDER.validate_payload(payload)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")


def test_a_payload_that_is_not_an_object_is_named_payload() -> None:
    with pytest.raises(InvalidPayload) as caught:
        ORDER.validate_payload([1, 2])  # type: ignore[arg-type]
    assert caught.value.field == "payload"


def test_route_slug_defaults_to_the_name_with_hyphens() -> None:
    plain = TaskType("customer_credits", Item, noop)
    assert plain.route_slug == "customer-credits"
    assert ORDER.route_slug == "orders"


def test_task_options_have_documented_defaults() -> None:
    options = TaskOptions()
    assert options.max_attempts is FROM_SETTINGS
    assert options.priority == 0
    assert options.queue == "default"
    assert options.timeout is FROM_SETTINGS
    assert options.concurrency is None


def test_attempts_and_timeout_left_unset_come_from_the_registry_defaults() -> None:
    unset = TaskType("unset", Item, noop)
    own = TaskType("own", Item, noop, TaskOptions(max_attempts=3, timeout=timedelta(seconds=9)))
    no_limit = TaskType("no_limit", Item, noop, TaskOptions(timeout=None))

    settled = TaskRegistry([unset, own, no_limit])
    configured = TaskRegistry([unset, own, no_limit],
                              TaskDefaults(max_attempts=2, timeout=timedelta(seconds=5)))

    assert (settled.max_attempts(unset), settled.timeout(unset)) == (5, timedelta(minutes=30))
    assert (configured.max_attempts(unset), configured.timeout(unset)) == (2, timedelta(seconds=5))
    assert (configured.max_attempts(own), configured.timeout(own)) == (3, timedelta(seconds=9))
    assert configured.timeout(no_limit) is None


def test_registry_finds_task_types_by_name_and_by_slug() -> None:
    registry = registry_with()
    assert registry.get("order") is ORDER
    assert registry.by_slug("orders") is ORDER
    assert "noop" in registry
    assert "nope" not in registry
    assert registry.names() == ["noop", "order"]
    assert list(registry) == [NOOP, ORDER]


def test_an_unknown_name_or_slug_raises_unknown_task_type() -> None:
    registry = registry_with()
    with pytest.raises(UnknownTaskType) as caught:
        registry.get("nope")
    assert caught.value.name == "nope"
    with pytest.raises(UnknownTaskType):
        registry.by_slug("order")  # the name is not the slug


def test_registering_a_name_twice_is_a_configuration_error() -> None:
    registry = registry_with()
    with pytest.raises(ConfigurationError, match="'noop' is registered twice"):
        registry.register(TaskType("noop", Item, noop))


def test_load_imports_each_module_and_registers_its_task_type() -> None:
    registry = TaskRegistry.load(["tests.carwash_jobs.support"])
    assert registry.names() == ["noop"]


def test_load_names_the_module_that_cannot_be_imported() -> None:
    with pytest.raises(ConfigurationError, match="CARWASH_TASK_TYPES: cannot import 'no_such_mod'"):
        TaskRegistry.load(["no_such_mod"])


def test_load_refuses_a_module_without_a_task_type() -> None:
    with pytest.raises(ConfigurationError, match="has no TASK_TYPE"):
        TaskRegistry.load(["json"])
