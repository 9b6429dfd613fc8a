//! How values reach a person: node data shown safely whatever its bytes,
//! names with control characters escaped, times in UTC, stats as text and
//! as JSON.

use serde_json::{json, Value};
use synod_client::Stat;

/// Bytes of a hex dump line.
const HEX_DUMP_LINE_BYTES: usize = 16;

/// Whether `data` is text a terminal can show as it is: valid UTF-8 without
/// control characters other than newline, tab and carriage return.
pub fn is_printable(data: &[u8]) -> bool {
    match std::str::from_utf8(data) {
        Ok(text) => text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r')),
        Err(_) => false,
    }
}

/// Node data for a terminal: printable text as it is, anything else as a
/// hex dump (offset, bytes, and the printable ASCII beside them), so a
/// binary value never scrambles the terminal.
pub fn data_for_terminal(data: &[u8]) -> String {
    if is_printable(data) {
        return String::from_utf8_lossy(data).into_owned();
    }
    let mut dump = format!("({} bytes of binary data)", data.len());
    for (line, chunk) in data.chunks(HEX_DUMP_LINE_BYTES).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&byte| {
                if byte.is_ascii_graphic() || byte == b' ' {
                    byte as char
                } else {
                    '.'
                }
            })
            .collect();
        dump.push_str(&format!(
            "\n{:08x}  {:<width$}  |{ascii}|",
            line * HEX_DUMP_LINE_BYTES,
            hex.join(" "),
            width = HEX_DUMP_LINE_BYTES * 3 - 1
        ));
    }
    dump
}

/// A one-line preview of node data for `watch` and `ls -l`: quoted text
/// (escaped, cut at `limit` characters) or a byte count for binary data.
pub fn data_preview(data: &[u8], limit: usize) -> String {
    if !is_printable(data) {
        return format!("<{} bytes binary>", data.len());
    }
    let text = String::from_utf8_lossy(data);
    let mut preview: String = text.chars().take(limit).collect();
    if text.chars().count() > limit {
        preview.push('…');
    }
    format!("{:?}", preview)
}

/// Node data as JSON fields: `data` holds the text when the bytes are UTF-8
/// (otherwise null) and `data_hex` holds every byte in hex when they are not.
pub fn data_json(data: &[u8]) -> Value {
    match std::str::from_utf8(data) {
        Ok(text) => json!({ "data": text }),
        Err(_) => json!({ "data": null, "data_hex": hex(data) }),
    }
}

/// Lower-case hex of `data`.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A node name with control characters escaped, so a hostile name cannot
/// drive the terminal.
pub fn name(raw: &str) -> String {
    if raw.chars().any(char::is_control) {
        raw.escape_debug().to_string()
    } else {
        raw.to_string()
    }
}

/// A time in ms since the Unix epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time_ms(ms: u64) -> String {
    let seconds = ms / 1000;
    let days = (seconds / 86_400) as i64;
    let of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60
    )
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A stat as aligned `field value` lines.
pub fn stat_text(path: &str, stat: &Stat) -> String {
    let owner = if stat.ephemeral_owner == 0 {
        "none (persistent)".to_string()
    } else {
        format!("session {:#x} (ephemeral)", stat.ephemeral_owner)
    };
    [
        format!("path                 {}", name(path)),
        format!(
            "created              revision {} at {} UTC",
            stat.created_revision,
            time_ms(stat.created_time_ms)
        ),
        format!(
            "modified             revision {} at {} UTC",
            stat.modified_revision,
            time_ms(stat.modified_time_ms)
        ),
        format!("version              {}", stat.version),
        format!("child version        {}", stat.child_version),
        format!("children             {}", stat.children_count),
        format!(
            "children modified    revision {}",
            stat.child_modified_revision
        ),
        format!("data length          {} bytes", stat.data_length),
        format!("owner                {owner}"),
    ]
    .join("\n")
}

/// A stat as a JSON object with the field names of the wire format.
pub fn stat_json(stat: &Stat) -> Value {
    serde_json::to_value(stat).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_shown_as_is_and_binary_as_hex() {
        assert_eq!(data_for_terminal(b"hello\nworld"), "hello\nworld");
        let dump = data_for_terminal(&[0x1b, b'[', b'2', b'J', 0xff]);
        assert!(dump.starts_with("(5 bytes of binary data)"));
        assert!(dump.contains("1b 5b 32 4a ff"));
        assert!(dump.contains("|.[2J.|"));
        assert!(!dump.contains('\x1b'));
    }

    #[test]
    fn previews_and_json() {
        assert_eq!(data_preview(b"abc", 10), "\"abc\"");
        assert_eq!(data_preview(b"abcdef", 3), "\"abc…\"");
        assert_eq!(data_preview(&[0, 1], 3), "<2 bytes binary>");
        assert_eq!(data_json(b"x"), json!({"data": "x"}));
        assert_eq!(
            data_json(&[0xff, 0]),
            json!({"data": null, "data_hex": "ff00"})
        );
        assert_eq!(name("a\u{1b}b"), "a\\u{1b}b");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(time_ms(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time_ms(1_764_135_045_000), "2025-11-26 05:30:45");
    }
}
