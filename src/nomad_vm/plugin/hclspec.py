"""nomad_vm.schema -> Nomad's hclspec protobuf (what ConfigSchema/TaskConfigSchema return)."""

from __future__ import annotations

from nomad_vm.fields import Field, Schema
from nomad_vm.plugin.proto import hclspec_pb2


def field_spec(f: Field) -> hclspec_pb2.Spec:
    if f.type == "block":
        nested = hclspec_pb2.Object()
        for inner in f.fields:
            nested.attributes[inner.name].CopyFrom(field_spec(inner))
        if f.repeated:
            return hclspec_pb2.Spec(
                block_list=hclspec_pb2.BlockList(
                    name=f.name, nested=hclspec_pb2.Spec(object=nested)
                )
            )
        if f.labeled:
            return hclspec_pb2.Spec(
                block_map=hclspec_pb2.BlockMap(
                    name=f.name, labels=["name"], nested=hclspec_pb2.Spec(object=nested)
                )
            )
        return hclspec_pb2.Spec(
            block_value=hclspec_pb2.Block(name=f.name, nested=hclspec_pb2.Spec(object=nested))
        )
    # Required-ness is checked by our own validation so the error names the field our way;
    # the spec only gives types and defaults.
    attr = hclspec_pb2.Spec(Attr=hclspec_pb2.Attr(name=f.name, type=f.type, required=False))
    default = f.hcl_default()
    if default is None:
        return attr
    return hclspec_pb2.Spec(
        default=hclspec_pb2.Default(
            primary=attr, default=hclspec_pb2.Spec(literal=hclspec_pb2.Literal(value=default))
        )
    )


def schema_spec(schema: Schema) -> hclspec_pb2.Spec:
    obj = hclspec_pb2.Object()
    for f in schema.fields:
        obj.attributes[f.name].CopyFrom(field_spec(f))
    return hclspec_pb2.Spec(object=obj)
