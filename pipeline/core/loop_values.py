"""What the looped GPipe step (:mod:`pipeline.core.looped`) carries across clock ticks: arrays and packed scalars.

TensorFlow lowers a ``tf.while_loop`` to dataflow control flow whose bookkeeping for every loop
variable sits on one device, and sends each loop variable there and back at every tick. So the
values that cross ticks live in resource TensorArrays on the device that reads them (the loop
carries only their flow scalars), and the loop's scalars travel packed, one vector per device::

    device 1 scalars (j, token, flows, loss) --stack--> [v] --tick--> [v'] --unstack--> ...
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf


class Arrays:
    """One TensorArray per leaf of a nest, made on the first write on the device that reads it.

    The arrays are TensorFlow's resource TensorArrays (``TensorArrayV3``): the data stays on the
    array's device, and a loop carries only each array's float "flow" scalar, which orders the
    reads after the writes. (A TF2 ``tf.TensorArray`` is a list value: a loop would carry the
    whole list, and copy it whenever the loop's bookkeeping sits on another device.)
    """

    def __init__(self, size: int, batched: bool = True):
        self.size = size
        self.batched = batched
        """Values differ in their first (batch) dimension; else every value has the first one's shape."""
        self.structure: Any = None
        self.handles: list[tf.Tensor | None] = []
        self.flows: list[tf.Tensor | None] | None = None
        self.shapes: list[tf.TensorShape | None] = []
        self.dtypes: list[tf.DType | None] = []

    def write(self, j: Any, value: Any, device: str) -> None:
        flat = tf.nest.flatten(value)
        with tf.device(device):
            if self.flows is None:
                self.structure = value
                self.shapes = [None if t is None else self.element_shape(t) for t in flat]
                self.dtypes = [None if t is None else t.dtype for t in flat]
                made = [None if t is None else tf.raw_ops.TensorArrayV3(
                    size=self.size, dtype=t.dtype, element_shape=shape, dynamic_size=False,
                    clear_after_read=False, identical_element_shapes=not self.batched)
                    for t, shape in zip(flat, self.shapes)]
                self.handles = [None if pair is None else pair[0] for pair in made]
                self.flows = [None if pair is None else pair[1] for pair in made]
            self.flows = [f if t is None else tf.raw_ops.TensorArrayWriteV3(handle=h, index=j, value=t, flow_in=f)
                          for h, f, t in zip(self.handles, self.flows, flat)]

    def split(self, value: Any, sizes: tf.Tensor, device: str) -> None:
        """Fills the arrays with ``value`` split along axis 0 into pieces of ``sizes`` (int64)."""
        flat = tf.nest.flatten(value)
        self.structure = value
        self.shapes = [None if t is None else self.element_shape(t) for t in flat]
        self.dtypes = [None if t is None else t.dtype for t in flat]
        self.handles, self.flows = [], []
        with tf.device(device):
            for t, shape in zip(flat, self.shapes):
                if t is None:
                    self.handles.append(None)
                    self.flows.append(None)
                    continue
                handle, flow = tf.raw_ops.TensorArrayV3(size=self.size, dtype=t.dtype, element_shape=shape,
                                                        clear_after_read=False)
                self.handles.append(handle)
                self.flows.append(tf.raw_ops.TensorArraySplitV3(handle=handle, value=t, lengths=sizes, flow_in=flow))

    def element_shape(self, value: tf.Tensor) -> tf.TensorShape:
        shape = value.shape
        if not self.batched or shape.rank is None or shape.rank == 0:
            return shape
        return tf.TensorShape([None, *shape[1:]])

    def read(self, j: Any, device: str) -> Any:
        flat = []
        with tf.device(device):
            for h, f, shape, dtype in zip(self.handles, self.flows, self.shapes, self.dtypes):
                if h is None:
                    flat.append(None)
                    continue
                value = tf.raw_ops.TensorArrayReadV3(handle=h, index=j, flow_in=f, dtype=dtype)
                value.set_shape(shape)
                flat.append(value)
        return tf.nest.pack_sequence_as(self.structure, flat)

    def concat_all(self) -> Any:
        flat = []
        for h, f, shape, dtype in zip(self.handles, self.flows, self.shapes, self.dtypes):
            if h is None:
                flat.append(None)
                continue
            value, _ = tf.raw_ops.TensorArrayConcatV3(handle=h, flow_in=f, dtype=dtype,
                                                      element_shape_except0=shape[1:] if shape.rank else None)
            value.set_shape(shape)
            flat.append(value)
        return tf.nest.pack_sequence_as(self.structure, flat)


class Packing:
    """Packs a flat list of scalar loop values into one float32 vector per group, and back.

    A group is the values of one device that one writer updates (by default: one group per
    device). Grouping by writer keeps a device's next tick from waiting for another device: a
    flow that the previous stage's action updates travels apart from the device's own counter
    and token, so the device's next action starts on its own and only its read of that array
    waits for the write::

        device 0, backward:  [j0, token0]          own: recompute of tick u+1 starts at once
                             [cut_grads[0] flow]    written by stage 1: only the read waits

    Float32 holds every value exactly: array flows and the loss are float32, counters and
    tokens are small integers. Non-scalars (none today) would travel as they are.

    Args:
        values: the loop's initial values.
        writers: per value, who updates it in the loop (values with the same device and writer are
            packed together); default: the value's device.
    """

    def __init__(self, values: list[tf.Tensor], writers: Sequence[str] | None = None):
        self.dtypes = [v.dtype for v in values]
        self.groups: dict[tuple[str, str], list[int]] = {}
        self.alone: list[int] = []
        for i, v in enumerate(values):
            if v.shape.rank == 0 and (v.dtype.is_floating or v.dtype.is_integer) and v.dtype.size <= 4:
                writer = v.device if writers is None else writers[i]
                self.groups.setdefault((v.device, writer), []).append(i)
            else:
                self.alone.append(i)
        self.size = len(values)

    def pack(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        packed = []
        for (device, _), members in self.groups.items():
            with tf.device(device or None):
                packed.append(tf.stack([tf.cast(values[i], tf.float32) for i in members]))
        return packed + [values[i] for i in self.alone]

    def unpack(self, packed: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        values: list[Any] = [None] * self.size
        for ((device, _), members), vector in zip(self.groups.items(), packed):
            with tf.device(device or None):
                for i, part in zip(members, tf.unstack(vector, num=len(members))):
                    values[i] = tf.cast(part, self.dtypes[i])
        for i, value in zip(self.alone, packed[len(self.groups):]):
            values[i] = value
        return values
