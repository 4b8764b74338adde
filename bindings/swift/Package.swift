// swift-tools-version:5.5
// hdb for Swift: CHdb (the C API as a system library found through pkg-config: install hdb
// with scripts/install.sh PREFIX and set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig) and Hdb (Swift
// classes over it).
import PackageDescription

let package = Package(
    name: "Hdb",
    products: [.library(name: "Hdb", targets: ["Hdb"])],
    targets: [
        .systemLibrary(name: "CHdb", path: "Sources/CHdb", pkgConfig: "hdb"),
        .target(name: "Hdb", dependencies: ["CHdb"]),
        .testTarget(name: "HdbTests", dependencies: ["Hdb"]),
    ]
)
