//! One graph edit, made once when a vision tower is loaded: its float
//! `pixel_values` input becomes a uint8 `pixel_bytes` input of the same
//! shape, and rescaling and normalisation run inside the graph.
//!
//! The edit prepends three nodes: `Cast` (uint8 to int32), `Add` (channel
//! `c` gets `256 * c`, so each channel has its own 256 entries) and `Gather`
//! from a table of `3 * 256` values, the very values host preprocessing
//! writes for each byte of each channel ([`crate::ImagePreprocessor::lut`]).
//! So the tower sees bit for bit the floats it saw before, while the host
//! writes one byte per value instead of four and, on a GPU, leaves the
//! float work to the device, which gets a quarter of the bytes (on a CPU
//! the three nodes cost more than the host's fused loop).
//!
//! ONNX files are protobuf: this module reads just enough of it (the model's
//! graph, the graph's inputs) and writes the new graph around the old
//! fields, copied byte for byte. Field numbers are those of `onnx.proto3`.

/// The uint8 input the edit adds.
pub const BYTES_INPUT: &str = "pixel_bytes";

/// ONNX `TensorProto.DataType` values used here.
const FLOAT: u64 = 1;
const UINT8: u64 = 2;
const INT32: u64 = 6;
const FLOAT16: u64 = 10;

/// One field of a protobuf message.
struct Field<'a> {
    number: u64,
    /// The whole field (tag included), to copy it unchanged.
    raw: &'a [u8],
    /// A length-delimited field's payload (empty for others).
    payload: &'a [u8],
    /// A varint field's value.
    value: u64,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// The fields of a message, in order.
fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let tag = varint(buf, &mut pos)?;
        let (number, wire) = (tag >> 3, tag & 7);
        let (payload, value) = match wire {
            0 => (&buf[0..0], varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                (&buf[0..0], 0)
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|e| e.to_string())?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len());
                let end = end.ok_or("length past the end of the message")?;
                let p = &buf[pos..end];
                pos = end;
                (p, 0)
            }
            5 => {
                pos += 4;
                (&buf[0..0], 0)
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        if pos > buf.len() {
            return Err("field past the end of the message".into());
        }
        out.push(Field {
            number,
            raw: &buf[start..pos],
            payload,
            value,
        });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, number: u64, v: u64) {
    put_varint(out, number << 3);
    put_varint(out, v);
}

/// `NodeProto`: inputs (1), outputs (2), name (3), op_type (4), an int
/// attribute (5: `AttributeProto` name 1, i 3, type 20 = INT).
fn node(inputs: &[&str], output: &str, name: &str, op: &str, attr: Option<(&str, u64)>) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, 1, i.as_bytes());
    }
    put_bytes(&mut n, 2, output.as_bytes());
    put_bytes(&mut n, 3, name.as_bytes());
    put_bytes(&mut n, 4, op.as_bytes());
    if let Some((key, v)) = attr {
        let mut a = Vec::new();
        put_bytes(&mut a, 1, key.as_bytes());
        put_uint(&mut a, 3, v);
        put_uint(&mut a, 20, 2);
        put_bytes(&mut n, 5, &a);
    }
    n
}

/// `TensorProto`: dims (1), data_type (2), name (8), raw_data (9).
fn tensor(name: &str, dims: &[u64], data_type: u64, raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        put_uint(&mut t, 1, *d);
    }
    put_uint(&mut t, 2, data_type);
    put_bytes(&mut t, 8, name.as_bytes());
    put_bytes(&mut t, 9, raw);
    t
}

/// The element type and the shape (its `TensorShapeProto` bytes, when it
/// has one) of a `ValueInfoProto`.
fn tensor_type(value_info: &[u8]) -> Result<(u64, Option<Vec<u8>>), String> {
    let ty = fields(value_info)?
        .into_iter()
        .find(|f| f.number == 2)
        .ok_or("the input has no type")?;
    let tensor = fields(ty.payload)?
        .into_iter()
        .find(|f| f.number == 1)
        .ok_or("the input is not a tensor")?;
    let (mut elem, mut shape) = (0, None);
    for f in fields(tensor.payload)? {
        match f.number {
            1 => elem = f.value,
            2 => shape = Some(f.payload.to_vec()),
            _ => {}
        }
    }
    Ok((elem, shape))
}

fn name_of(value_info: &[u8]) -> Result<&[u8], String> {
    Ok(fields(value_info)?
        .into_iter()
        .find(|f| f.number == 1)
        .map_or(&[][..], |f| f.payload))
}

/// Names the edit adds to the graph.
const ADDED: [&str; 5] = [
    BYTES_INPUT,
    "clipstream_pixel_index0",
    "clipstream_pixel_index",
    "clipstream_pixel_lut",
    "clipstream_channel_offsets",
];

/// The edit needs IR 4 (initializers need not be graph inputs) and the
/// default domain's opset 7 (`Add` broadcasts, `Cast` takes `to` as an int).
fn check_versions(top: &[Field<'_>]) -> Result<(), String> {
    let ir = top.iter().find(|f| f.number == 1).map_or(0, |f| f.value);
    if ir < 4 {
        return Err(format!("ONNX IR version {ir}; 4 or later needed"));
    }
    for f in top.iter().filter(|f| f.number == 8) {
        let (mut domain, mut version) = (&[][..], 0);
        for g in fields(f.payload)? {
            match g.number {
                1 => domain = g.payload,
                2 => version = g.value,
                _ => {}
            }
        }
        if (domain.is_empty() || domain == b"ai.onnx") && version < 7 {
            return Err(format!("opset {version}; 7 or later needed"));
        }
    }
    Ok(())
}

/// Refuses a graph that already uses a name the edit adds, whose `input`
/// is also an initializer, or whose weights are in external data (the
/// edited model is loaded from memory, where no file lies beside it).
fn check_names(graph: &[Field<'_>], input: &str) -> Result<(), String> {
    let mut names: Vec<(&[u8], &str)> = Vec::new();
    for f in graph {
        match f.number {
            // Node outputs.
            1 => {
                for g in fields(f.payload)?.into_iter().filter(|g| g.number == 2) {
                    names.push((g.payload, "a node output"));
                }
            }
            // Initializers: their names, and where their data lies.
            5 => {
                for g in fields(f.payload)? {
                    match g.number {
                        8 => names.push((g.payload, "an initializer")),
                        14 if g.value == 1 => {
                            return Err("its weights are in external data; the uint8 input \
                                        needs them inside the .onnx file"
                                .into());
                        }
                        _ => {}
                    }
                }
            }
            11 => names.push((name_of(f.payload)?, "a graph input")),
            _ => {}
        }
    }
    for (name, what) in names {
        if let Some(added) = ADDED.iter().find(|a| a.as_bytes() == name) {
            return Err(format!("`{added}` is already {what} of the graph"));
        }
        if name == input.as_bytes() && what == "an initializer" {
            return Err(format!("`{input}` is also an initializer"));
        }
    }
    Ok(())
}

/// `model` (a serialised `ModelProto`) with its graph input `input` (a
/// float or float16 image batch) replaced by the uint8 [`BYTES_INPUT`] of
/// the same shape, mapped through `lut` (per channel: the value of each
/// byte) inside the graph.
pub fn uint8_pixels(model: &[u8], input: &str, lut: &[[f32; 256]; 3]) -> Result<Vec<u8>, String> {
    let top = fields(model)?;
    check_versions(&top)?;
    let mut graphs = top.iter().filter(|f| f.number == 7);
    let graph = graphs.next().ok_or("the model has no graph")?;
    if graphs.next().is_some() {
        return Err("the model has its graph in several pieces".into());
    }
    let graph_fields = fields(graph.payload)?;
    check_names(&graph_fields, input)?;
    let mut found = None;
    for f in graph_fields.iter().filter(|f| f.number == 11) {
        if name_of(f.payload)? == input.as_bytes() {
            found = Some(tensor_type(f.payload)?);
        }
    }
    let (elem, shape) = found.ok_or_else(|| format!("the graph has no input `{input}`"))?;
    let table: Vec<u8> = match elem {
        FLOAT => lut.iter().flatten().flat_map(|v| v.to_le_bytes()).collect(),
        FLOAT16 => lut
            .iter()
            .flatten()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        other => {
            return Err(format!(
                "input `{input}` has element type {other}; float or float16 expected"
            ));
        }
    };
    let offsets: Vec<u8> = [0i32, 256, 512]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();

    let mut g = Vec::new();
    // The new nodes first: ONNX lists nodes in topological order.
    put_bytes(
        &mut g,
        1,
        &node(
            &[BYTES_INPUT],
            "clipstream_pixel_index0",
            "clipstream_cast",
            "Cast",
            Some(("to", INT32)),
        ),
    );
    put_bytes(
        &mut g,
        1,
        &node(
            &["clipstream_pixel_index0", "clipstream_channel_offsets"],
            "clipstream_pixel_index",
            "clipstream_channel_offsets_add",
            "Add",
            None,
        ),
    );
    put_bytes(
        &mut g,
        1,
        &node(
            &["clipstream_pixel_lut", "clipstream_pixel_index"],
            input,
            "clipstream_pixel_lut_gather",
            "Gather",
            Some(("axis", 0)),
        ),
    );
    for f in &graph_fields {
        if f.number == 11 && name_of(f.payload)? == input.as_bytes() {
            // The new input, in the old one's place.
            let mut tensor_ty = Vec::new();
            put_uint(&mut tensor_ty, 1, UINT8);
            if let Some(shape) = &shape {
                put_bytes(&mut tensor_ty, 2, shape);
            }
            let mut ty = Vec::new();
            put_bytes(&mut ty, 1, &tensor_ty);
            let mut vi = Vec::new();
            put_bytes(&mut vi, 1, BYTES_INPUT.as_bytes());
            put_bytes(&mut vi, 2, &ty);
            put_bytes(&mut g, 11, &vi);
        } else {
            g.extend_from_slice(f.raw);
        }
    }
    put_bytes(
        &mut g,
        5,
        &tensor("clipstream_pixel_lut", &[768], elem, &table),
    );
    put_bytes(
        &mut g,
        5,
        &tensor("clipstream_channel_offsets", &[1, 3, 1, 1], INT32, &offsets),
    );

    let mut out = Vec::with_capacity(model.len() + g.len() - graph.payload.len() + 16);
    for f in &top {
        if f.number == 7 {
            put_bytes(&mut out, 7, &g);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_bad_bytes_are_errors() {
        let mut m = Vec::new();
        put_uint(&mut m, 1, 300);
        put_bytes(&mut m, 7, b"abc");
        let f = fields(&m).expect("fields");
        assert_eq!((f[0].number, f[0].value), (1, 300));
        assert_eq!((f[1].number, f[1].payload), (7, &b"abc"[..]));
        let raw: Vec<u8> = f.iter().flat_map(|f| f.raw.to_vec()).collect();
        assert_eq!(raw, m);
        // A length past the end, a truncated varint, an unknown wire type.
        for bad in [&[0x3a, 0x05, b'a'][..], &[0x08, 0x80][..], &[0x0b][..]] {
            assert!(fields(bad).is_err(), "{bad:?}");
        }
        let lut = [[0f32; 256]; 3];
        assert!(uint8_pixels(&m, "pixel_values", &lut).is_err());
        assert!(uint8_pixels(&[0xff, 0xff], "pixel_values", &lut).is_err());
    }

    /// A model with `pixel_values` (float [1,3,2,2]) and whatever `extra`
    /// graph fields, at IR `ir` and opset `opset`.
    fn model(ir: u64, opset: u64, extra: &[u8]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in [1u64, 3, 2, 2] {
            let mut dim = Vec::new();
            put_uint(&mut dim, 1, d);
            put_bytes(&mut shape, 1, &dim);
        }
        let mut tensor_ty = Vec::new();
        put_uint(&mut tensor_ty, 1, FLOAT);
        put_bytes(&mut tensor_ty, 2, &shape);
        let mut ty = Vec::new();
        put_bytes(&mut ty, 1, &tensor_ty);
        let mut vi = Vec::new();
        put_bytes(&mut vi, 1, b"pixel_values");
        put_bytes(&mut vi, 2, &ty);
        let mut g = Vec::new();
        put_bytes(&mut g, 11, &vi);
        g.extend_from_slice(extra);
        let mut op = Vec::new();
        put_bytes(&mut op, 1, b"");
        put_uint(&mut op, 2, opset);
        let mut m = Vec::new();
        put_uint(&mut m, 1, ir);
        put_bytes(&mut m, 8, &op);
        put_bytes(&mut m, 7, &g);
        m
    }

    #[test]
    fn what_the_edit_cannot_do_is_refused_with_the_reason() {
        let lut = [[0.5f32; 256]; 3];
        let edited = uint8_pixels(&model(8, 17, &[]), "pixel_values", &lut).expect("edits");
        // The new input replaces the old one; the table has 768 values.
        let top = fields(&edited).expect("model");
        let graph = fields(top.iter().find(|f| f.number == 7).expect("graph").payload)
            .expect("graph fields");
        let inputs: Vec<&[u8]> = graph
            .iter()
            .filter(|f| f.number == 11)
            .map(|f| name_of(f.payload).expect("name"))
            .collect();
        assert_eq!(inputs, vec![BYTES_INPUT.as_bytes()]);
        assert_eq!(graph.iter().filter(|f| f.number == 1).count(), 3);
        let (elem, shape) = tensor_type(
            graph
                .iter()
                .find(|f| f.number == 11)
                .expect("input")
                .payload,
        )
        .expect("type");
        assert_eq!(elem, UINT8);
        assert!(shape.is_some());

        let err = |m: Vec<u8>| uint8_pixels(&m, "pixel_values", &lut).expect_err("refused");
        assert!(err(model(3, 17, &[])).contains("IR version 3"));
        assert!(err(model(8, 6, &[])).contains("opset 6"));
        let mut external = Vec::new();
        put_bytes(&mut external, 8, b"w");
        put_uint(&mut external, 14, 1);
        let mut g = Vec::new();
        put_bytes(&mut g, 5, &external);
        assert!(err(model(8, 17, &g)).contains("external data"));
        let mut taken = Vec::new();
        put_bytes(&mut taken, 8, b"clipstream_pixel_lut");
        let mut g = Vec::new();
        put_bytes(&mut g, 5, &taken);
        assert!(err(model(8, 17, &g)).contains("`clipstream_pixel_lut` is already an initializer"));
        let mut g = Vec::new();
        put_bytes(
            &mut g,
            1,
            &node(&["x"], "clipstream_pixel_index", "n", "Relu", None),
        );
        assert!(err(model(8, 17, &g)).contains("already a node output"));
        let mut init = Vec::new();
        put_bytes(&mut init, 8, b"pixel_values");
        let mut g = Vec::new();
        put_bytes(&mut g, 5, &init);
        assert!(err(model(8, 17, &g)).contains("also an initializer"));
        let mut twice = model(8, 17, &[]);
        let graph_again: Vec<u8> = fields(&twice.clone())
            .expect("fields")
            .iter()
            .filter(|f| f.number == 7)
            .flat_map(|f| f.raw.to_vec())
            .collect();
        twice.extend_from_slice(&graph_again);
        assert!(err(twice).contains("several pieces"));
    }
}
