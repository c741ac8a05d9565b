//! Reads the Prometheus text format that `/metrics` serves: one sample per line,
//! `name{label="value",…} value`. Enough for our own exposition (label values are fixed words;
//! escapes are honoured anyway); comments and malformed lines are skipped.

/// One line of the exposition: the metric name, its labels, its value.
type Line = (String, Vec<(String, String)>, f64);

#[derive(Debug, Default)]
pub(crate) struct Scrape {
    samples: Vec<Line>,
}

impl Scrape {
    pub(crate) fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Scrape { samples }
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
            .sum()
    }
}

fn parse_line(line: &str) -> Option<Line> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_owned(), Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name.to_owned(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_label_subset() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE tpns_cache_lookups_total counter\n\
             tpns_cache_lookups_total{op=\"account_tokens\",outcome=\"hit\"} 3\n\
             tpns_cache_lookups_total{op=\"token_accounts\",outcome=\"hit\"} 4\n\
             tpns_cache_lookups_total{op=\"token_accounts\",outcome=\"miss\"} 5\n\
             tpns_cache_entries 7\nweird{a=\"q\\\"uote\",b=\"x\"} 1\nbroken line\n",
        );
        assert_eq!(s.sum("tpns_cache_lookups_total", &[]), 12.0);
        assert_eq!(
            s.sum("tpns_cache_lookups_total", &[("outcome", "hit")]),
            7.0
        );
        assert_eq!(
            s.sum(
                "tpns_cache_lookups_total",
                &[("outcome", "hit"), ("op", "token_accounts")]
            ),
            4.0
        );
        assert_eq!(s.sum("tpns_cache_entries", &[]), 7.0);
        assert_eq!(s.sum("weird", &[("a", "q\"uote"), ("b", "x")]), 1.0);
        assert_eq!(s.sum("absent", &[]), 0.0);
    }
}
