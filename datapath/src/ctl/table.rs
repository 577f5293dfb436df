//! Plain aligned columns, like kubectl's: the widest column gives way first when the
//! terminal is narrower than the table.

/// Rows under a header.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// `$COLUMNS`, else 160 (pipes and scripts get whole cells up to that).
pub fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|c: &usize| *c >= 40)
        .unwrap_or(160)
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table in at most `width` columns per line (cells cut with `…`).
    pub fn render(&self, width: usize) -> String {
        const GAP: usize = 3;
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let total = |w: &[usize]| w.iter().sum::<usize>() + GAP * w.len().saturating_sub(1);
        // Shrink the widest column (never below its header or 8) until the table fits.
        while total(&widths) > width {
            let (i, w) = widths
                .iter()
                .enumerate()
                .max_by_key(|(_, w)| **w)
                .map(|(i, w)| (i, *w))
                .unwrap_or((0, 0));
            let floor = self.header[i].chars().count().max(8);
            if w <= floor {
                break;
            }
            widths[i] = w - 1;
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                let cell = cut(cell, *w);
                line.push_str(&cell);
                if i + 1 < columns {
                    line.push_str(&" ".repeat(w - cell.chars().count() + GAP));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn cut(cell: &str, width: usize) -> String {
    if cell.chars().count() <= width {
        cell.to_string()
    } else {
        let mut s: String = cell.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_shrink_to_the_width() {
        let mut t = Table::new(&["NAME", "LABELS"]);
        t.row(vec![
            "a".into(),
            "k8s:app=web,k8s:io.kubernetes.pod.namespace=x".into(),
        ]);
        t.row(vec!["bbbb".into(), "-".into()]);
        let wide = t.render(200);
        assert_eq!(
            wide,
            "NAME   LABELS\na      k8s:app=web,k8s:io.kubernetes.pod.namespace=x\nbbbb   -\n"
        );
        let narrow = t.render(30);
        assert!(narrow.lines().all(|l| l.chars().count() <= 30), "{narrow}");
        assert!(narrow.contains('…'));
    }
}
