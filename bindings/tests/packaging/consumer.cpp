// The README's C++ example (scripts/test-bindings.sh builds it through CMake and runs it).
#include <hdb.hpp>
#include <cstdio>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    try {
        hdb::Runtime rt = hdb::Runtime::create("cpu");
        hdb::Model model = hdb::Model::load(rt, argv[1]);
        hdb::Session session = hdb::Session::create(model);
        hdb::GenerateParams p = hdb::generate_params();
        p.prompt = "a photo of a person";
        p.width = p.height = 64;
        p.steps = 2;
        std::vector<hdb::Image> images = session.generate(p);
        std::printf("%ux%u image, first byte %u\n", images[0].width, images[0].height, images[0].pixels[0]);
    } catch (const hdb::Error &e) {
        std::fprintf(stderr, "%s: %s\n", hdb::status_name(e.status()), e.what());
        return 1;
    }
    return 0;
}
