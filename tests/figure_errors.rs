//! Under the notebook runner (`GENLAB_AUTO_EXPORT` set), a figure that cannot be drawn is
//! recorded in the export folder's `genlab-figure-errors.txt`, which the runner reads after
//! every cell (stderr can come late or never). Its own test binary: it sets the environment.

use genlab::plot::{Figure, FIGURE_ERRORS};

#[test]
fn a_figure_that_cannot_be_drawn_is_recorded_for_the_runner() {
    let dir = std::env::temp_dir().join(format!("genlab-figure-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("GENLAB_EXPORT_DIR", &dir);
    std::env::set_var("GENLAB_AUTO_EXPORT", "1");
    let xs = [0.0f64, 1.0, 2.0];
    Figure::new("fine").line("y", &xs, &xs).evcxr_display();
    assert!(
        !dir.join(FIGURE_ERRORS).exists(),
        "a good figure records nothing"
    );
    Figure::new("broken")
        .line("y", &xs, &xs[..2])
        .evcxr_display();
    let text = std::fs::read_to_string(dir.join(FIGURE_ERRORS)).unwrap();
    // Its two auto-exported files, then its display.
    assert!(
        text.contains("could not export") && text.contains("could not be drawn"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.contains("series `y`")), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
